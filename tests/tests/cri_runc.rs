//! The CRI client and the pod fixtures against the reference runtime (runc): a pod with
//! two containers sharing a volume runs through containerd's CRI plugin, logs are read,
//! ExecSync works, and the pod is removed. This is the same sequence `cri_kvm.rs` runs with
//! Carapace's handler; here it checks the harness itself. Needs root; no KVM.

use std::time::Duration;

use carapace_tests::containerd::{BUSYBOX_IMAGE, Containerd, PAUSE_IMAGE};
use carapace_tests::cri::{ContainerSpec, Cri, PodSpec, log_text};

#[test]
fn a_two_container_pod_runs_under_runc_through_cri() {
    assert!(carapace_tests::is_root(), "needs root (containerd, mounts)");
    let dir = tempfile::Builder::new()
        .prefix("carapace-cri-runc-")
        .tempdir()
        .expect("tempdir");
    let ctrd =
        Containerd::start(&dir.path().join("containerd"), &[], None, &[]).expect("containerd");
    ctrd.import_cri_images(dir.path()).expect("images");
    let mut cri = Cri::connect(&ctrd.socket()).expect("connect");
    assert!(cri.version().expect("version").starts_with("containerd"));
    assert!(cri.has_image(PAUSE_IMAGE).expect("image status"));

    let pod = PodSpec {
        name: "runc-pod".into(),
        namespace: "default".into(),
        handler: "runc".into(),
        log_dir: dir.path().join("logs"),
        privileged: false,
    };
    let shared = dir.path().join("empty-dir");
    std::fs::create_dir_all(&shared).expect("volume");
    let pod_id = cri
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("{e}\n{}", ctrd.log()));
    let writer = ContainerSpec {
        name: "writer".into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo from-writer > /data/note; echo wrote; exec sleep 600".into(),
        ],
        mounts: vec![(shared.clone(), "/data".into())],
        ..Default::default()
    };
    let w = cri
        .create_container(&pod_id, &pod, &writer)
        .expect("create writer");
    cri.start_container(&w).expect("start writer");
    let (code, out, _) = cri
        .exec_sync(
            &w,
            &[
                "sh",
                "-c",
                "while [ ! -e /data/note ]; do sleep 0.1; done; cat /data/note",
            ],
            Duration::from_secs(60),
        )
        .expect("exec");
    assert_eq!((code, out.as_str()), (0, "from-writer\n"));

    let reader = ContainerSpec {
        name: "reader".into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["sh".into(), "-c".into(), "cat /data/note; exit 4".into()],
        mounts: vec![(shared, "/data".into())],
        ..Default::default()
    };
    let r = cri
        .create_container(&pod_id, &pod, &reader)
        .expect("create reader");
    cri.start_container(&r).expect("start reader");
    assert_eq!(
        cri.wait_exited(&r, Duration::from_secs(60)).expect("exit"),
        4
    );
    assert_eq!(
        log_text(&pod.log_dir.join("reader.log")).expect("log"),
        "from-writer\n"
    );
    assert_eq!(
        log_text(&pod.log_dir.join("writer.log")).expect("log"),
        "wrote\n"
    );

    cri.remove_pod(&pod_id).expect("remove pod");
    assert!(cri.pods().expect("list").is_empty());
}
