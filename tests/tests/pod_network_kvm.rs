//! Pod networking end to end: a CRI pod with its own CNI network (the tests' containerd:
//! dual-stack bridge `cni-carapace0`, host-local 10.213.0.0/16 and fd00:213::/64, portmap)
//! runs in a microVM whose NIC mirrors the pod's CNI interface. The host fetches from the
//! pod at its IPv4 and IPv6 addresses and through a hostPort, a second pod (another
//! microVM) fetches from it at both addresses, a container reaches a server
//! on the bridge's gateway addresses (both families), two containers of the pod talk over
//! 127.0.0.1, and after the pod is removed nothing of it is left.
//! Where this host cannot boot guests the test runs inside the lab.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use carapace_tests::containerd::{BUSYBOX_IMAGE, CNI_GATEWAY, CNI_GATEWAY6, CarapaceCri};
use carapace_tests::cri::{ContainerSpec, Cri, PodNetwork, PodSpec, log_text};
use carapace_tests::kvm_test;
use carapace_tests::net::{http_get, web_server};

/// Serves one HTTP response on `listener` (the gateway side of a pod's request).
fn serve_once(listener: TcpListener, body: &'static str) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        listener.set_nonblocking(false).ok();
        let Ok((mut s, _)) = listener.accept() else {
            return false;
        };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(reply.as_bytes()).is_ok()
    })
}

kvm_test! {
    #[lab(carapace_tests::lab::Lab::new().mem_mib(4096).timeout(Duration::from_secs(1200)))]
    fn a_cni_pod_in_a_microvm_is_reachable_and_reaches_out() {
        let tmp = tempfile::Builder::new().prefix("cnet-").tempdir().expect("tempdir");
        let rig = CarapaceCri::start(tmp.path());
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! { rig.fail(what, e) };
        let mut cri = Cri::connect(&rig.ctrd.socket()).expect("connect");
        let pod = PodSpec {
            name: "net-pod".into(),
            namespace: "default".into(),
            handler: "carapace".into(),
            log_dir: tmp.path().join("logs"),
            privileged: false,
            network: PodNetwork::Cni {
                ports: vec![(8080, 18082)],
            },
        };
        let pod_id = cri.run_pod(&pod).unwrap_or_else(|e| fail("RunPodSandbox", &e));
        let ips = cri.pod_ips(&pod_id).unwrap_or_else(|e| fail("PodSandboxStatus", &e));
        let ip = ips.first().cloned().unwrap_or_else(|| fail("pod IP", &"none reported"));
        assert!(ip.starts_with("10.213."), "{ips:?}");
        let ip6 = ips
            .iter()
            .find(|a| a.starts_with("fd00:213:"))
            .cloned()
            .unwrap_or_else(|| fail("pod IPv6 address", &format!("{ips:?}")));

        // a web server in the pod
        let web = web_server("hello-from-the-vm", 8080);
        let w = cri
            .create_container(&pod_id, &pod, &web)
            .unwrap_or_else(|e| fail("CreateContainer web", &e));
        cri.start_container(&w).unwrap_or_else(|e| fail("StartContainer web", &e));

        // the host reaches it at the pod's IP and through the hostPort on the gateway
        let body = http_get(&format!("{ip}:8080"), Duration::from_secs(120))
            .unwrap_or_else(|e| fail(&format!("GET {ip}:8080 from the host"), &e));
        assert!(body.contains("hello-from-the-vm"), "{body}");
        let body = http_get(&format!("[{ip6}]:8080"), Duration::from_secs(60))
            .unwrap_or_else(|e| fail(&format!("GET [{ip6}]:8080 from the host"), &e));
        assert!(body.contains("hello-from-the-vm"), "over IPv6: {body}");
        let body = http_get(&format!("{CNI_GATEWAY}:18082"), Duration::from_secs(60))
            .unwrap_or_else(|e| fail("GET through the hostPort", &e));
        assert!(body.contains("hello-from-the-vm"), "{body}");

        // another pod (its own microVM and CNI interface) fetches from the first at both of
        // its addresses: pod to pod across the bridge
        let other = PodSpec {
            name: "net-peer".into(),
            network: PodNetwork::Cni { ports: vec![] },
            log_dir: tmp.path().join("peer-logs"),
            ..pod.clone()
        };
        let other_id = cri.run_pod(&other).unwrap_or_else(|e| fail("RunPodSandbox peer", &e));
        let other_ips = cri.pod_ips(&other_id).unwrap_or_else(|e| fail("PodSandboxStatus peer", &e));
        assert!(
            other_ips.iter().all(|a| !ips.contains(a)),
            "two pods share an address: {ips:?} {other_ips:?}"
        );
        let peer = ContainerSpec {
            name: "peer".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "wget -q -O - http://{ip}:8080/ && echo && \
                     wget -q -O - http://[{ip6}]:8080/ && echo; exit 7"
                ),
            ],
            ..Default::default()
        };
        let p = cri
            .create_container(&other_id, &other, &peer)
            .unwrap_or_else(|e| fail("CreateContainer peer", &e));
        cri.start_container(&p).unwrap_or_else(|e| fail("StartContainer peer", &e));
        let code = cri
            .wait_exited(&p, Duration::from_secs(300))
            .unwrap_or_else(|e| fail("peer exit", &e));
        let log = log_text(&other.log_dir.join("peer.log")).expect("peer log");
        assert_eq!(code, 7, "peer log: {log:?}");
        assert_eq!(
            log.matches("hello-from-the-vm").count(),
            2,
            "pod to pod over IPv4 and IPv6: {log:?}"
        );
        cri.remove_pod(&other_id).unwrap_or_else(|e| fail("remove peer pod", &e));

        // a second container: the first over 127.0.0.1, and a server on the gateway
        let listener = TcpListener::bind(format!("{CNI_GATEWAY}:0")).expect("bind on the bridge");
        let port = listener.local_addr().expect("addr").port();
        let served = serve_once(listener, "hello-from-the-gateway");
        let listener6 =
            TcpListener::bind(format!("[{CNI_GATEWAY6}]:0")).expect("bind on the bridge (IPv6)");
        let port6 = listener6.local_addr().expect("addr").port();
        let served6 = serve_once(listener6, "hello-over-ipv6");
        let client = ContainerSpec {
            name: "client".into(),
            image: BUSYBOX_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "wget -q -O - http://127.0.0.1:8080/ && \
                     wget -q -O - http://{CNI_GATEWAY}:{port}/ && echo && \
                     wget -q -O - http://[{CNI_GATEWAY6}]:{port6}/ && echo; exit 7"
                ),
            ],
            ..Default::default()
        };
        let c = cri
            .create_container(&pod_id, &pod, &client)
            .unwrap_or_else(|e| fail("CreateContainer client", &e));
        cri.start_container(&c).unwrap_or_else(|e| fail("StartContainer client", &e));
        let code = cri
            .wait_exited(&c, Duration::from_secs(300))
            .unwrap_or_else(|e| fail("client exit", &e));
        let log = log_text(&pod.log_dir.join("client.log")).expect("client log");
        assert_eq!(code, 7, "client log: {log:?}");
        assert!(log.contains("hello-from-the-vm"), "localhost in the pod: {log:?}");
        assert!(log.contains("hello-from-the-gateway"), "out to the gateway: {log:?}");
        assert!(log.contains("hello-over-ipv6"), "out to the gateway over IPv6: {log:?}");
        assert!(served.join().expect("server thread"), "the gateway served the pod");
        assert!(served6.join().expect("server thread"), "the gateway served the pod (IPv6)");

        cri.remove_pod(&pod_id).unwrap_or_else(|e| fail("remove pod", &e));
        assert!(cri.pods().expect("list pods").is_empty());
        let left: Vec<_> = std::fs::read_dir(&rig.state)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "sandbox state left: {left:?}");
        // the taps lived in the pod's namespace, which containerd deletes: none anywhere
        let links = std::process::Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip link");
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(!links.contains("_carapace"), "a tap left on the host: {links}");
    }
}
