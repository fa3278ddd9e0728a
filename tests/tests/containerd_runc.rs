//! The fixtures and the private containerd against the reference runtime (runc): the
//! locally built busybox image imports and runs. Needs root; no KVM.

use carapace_tests::containerd::Containerd;
use carapace_tests::fixtures::{busybox_rootfs, oci_image_archive};

#[test]
fn busybox_image_imports_and_runs_under_runc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    let archive = dir.path().join("busybox.tar");
    let name = "docker.io/carapace/busybox:test";
    oci_image_archive(&rootfs, name, &["sh"], dir.path(), &archive).expect("image");

    let ctrd =
        Containerd::start(&dir.path().join("containerd"), &[], None, &[]).expect("containerd");
    ctrd.import(&archive).expect("import");
    let images = ctrd.ctr(&["image", "ls", "-q"]).expect("image ls");
    assert!(String::from_utf8_lossy(&images.stdout).contains(name));

    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            name,
            "runc-smoke",
            "sh",
            "-c",
            "echo hello pid=$$",
        ])
        .expect("ctr run");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello pid=1");

    // a non-zero exit status comes back through ctr
    let err = ctrd
        .ctr(&["run", "--rm", name, "runc-exit", "sh", "-c", "exit 3"])
        .expect_err("exit 3");
    assert!(
        matches!(
            err,
            carapace_tests::containerd::ContainerdError::Ctr {
                status: Some(3),
                ..
            }
        ),
        "{err}"
    );
}
