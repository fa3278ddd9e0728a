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
        network: Default::default(),
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

/// The tests' CNI network against the reference runtime: a pod with its own network gets
/// an address on the bridge from PodSandboxStatus, serves HTTP that the host fetches at
/// `<pod IP>:8080` and through a hostPort on the bridge's address, and after its removal
/// its address is free again (no veth left). What Carapace's pods must match.
#[test]
fn a_cni_pod_under_runc_gets_an_address_and_serves_the_host() {
    use carapace_tests::containerd::CNI_GATEWAY;
    use carapace_tests::cri::PodNetwork;
    use carapace_tests::net::{http_get, web_server};

    assert!(carapace_tests::is_root(), "needs root (containerd, CNI)");
    let dir = tempfile::Builder::new()
        .prefix("carapace-cri-runc-cni-")
        .tempdir()
        .expect("tempdir");
    let ctrd =
        Containerd::start(&dir.path().join("containerd"), &[], None, &[]).expect("containerd");
    ctrd.import_cri_images(dir.path()).expect("images");
    let mut cri = Cri::connect(&ctrd.socket()).expect("connect");
    let pod = PodSpec {
        name: "runc-cni-pod".into(),
        namespace: "default".into(),
        handler: "runc".into(),
        log_dir: dir.path().join("logs"),
        privileged: false,
        network: PodNetwork::Cni {
            ports: vec![(8080, 18080)],
        },
    };
    let pod_id = cri
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("{e}\n{}", ctrd.log()));
    let ips = cri.pod_ips(&pod_id).expect("pod status");
    let ip = ips.first().cloned().expect("the pod has an address");
    assert!(ip.starts_with("10.213."), "{ips:?}");
    let ip6 = ips
        .iter()
        .find(|a| a.starts_with("fd00:213:"))
        .cloned()
        .unwrap_or_else(|| panic!("an IPv6 address too: {ips:?}"));
    let server = web_server("hello-from-the-pod", 8080);
    let web = cri
        .create_container(&pod_id, &pod, &server)
        .expect("create web");
    cri.start_container(&web).expect("start web");
    let body = http_get(&format!("{ip}:8080"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET {ip}:8080: {e}\n{}", ctrd.log()));
    assert!(body.contains("hello-from-the-pod"), "{body}");
    let body = http_get(&format!("[{ip6}]:8080"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET [{ip6}]:8080: {e}"));
    assert!(body.contains("hello-from-the-pod"), "over IPv6: {body}");
    let body = http_get(&format!("{CNI_GATEWAY}:18080"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET through the hostPort: {e}"));
    assert!(body.contains("hello-from-the-pod"), "{body}");
    cri.remove_pod(&pod_id).expect("remove pod");
    assert!(cri.pods().expect("list").is_empty());
}
