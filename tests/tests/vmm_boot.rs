//! carapace-vmm end to end: boot the project's guest kernel with a test /init
//! (`carapace-vmm-guest-test`, not the agent) where KVM can boot guests (the lab on hosts
//! without hardware virtualization), then exercise the devices from both sides.
//!
//! The fixture is built on the host: the static test program with cargo, the kernel and
//! initramfs through `carapace-image` (cached kernel, our program as /init), the VMM binary.
//! Paths reach the lab run through environment variables.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use carapace_image::image::{self, BuildOptions};
use carapace_tests::lab::{Lab, in_kvm};

const ENV_VMM: &str = "CARAPACE_VMM_E2E_VMM";
const ENV_KERNEL: &str = "CARAPACE_VMM_E2E_KERNEL";
const ENV_INITRD: &str = "CARAPACE_VMM_E2E_INITRD";
const ENV_FSD: &str = "CARAPACE_VMM_E2E_FSD";
/// Guest boots under TCG-emulated SVM take tens of seconds.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
/// How long the 16 MiB TCP echo over virtio-net may take in all (TCG lab: seconds to a
/// minute normally).
const ECHO_DEADLINE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Fixture {
    vmm: PathBuf,
    fsd: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn cargo(args: &[&str], rustflags: Option<&str>) {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args).current_dir(workspace_root());
    if let Some(f) = rustflags {
        c.env("RUSTFLAGS", f);
    }
    let st = c.status().expect("run cargo");
    assert!(st.success(), "cargo {} failed: {st}", args.join(" "));
}

impl Fixture {
    /// From the environment (inside the lab), or built now (on the host).
    fn get() -> Self {
        if let (Some(v), Some(k), Some(i), Some(d)) = (
            std::env::var_os(ENV_VMM),
            std::env::var_os(ENV_KERNEL),
            std::env::var_os(ENV_INITRD),
            std::env::var_os(ENV_FSD),
        ) {
            return Fixture {
                vmm: v.into(),
                fsd: d.into(),
                kernel: k.into(),
                initrd: i.into(),
            };
        }
        let root = workspace_root();
        cargo(
            &["build", "-q", "-p", "carapace-vmm", "--bin", "carapace-vmm"],
            None,
        );
        cargo(
            &[
                "build",
                "-q",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "-p",
                "carapace-test-programs",
                "--bin",
                "carapace-vmm-guest-test",
            ],
            Some("-C target-feature=+crt-static"),
        );
        let guest_test =
            root.join("target/x86_64-unknown-linux-gnu/release/carapace-vmm-guest-test");
        let opts = BuildOptions {
            out_dir: Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-e2e-image"),
            cache_dir: image::DEFAULT_CACHE_DIR.into(),
            agent: Some(guest_test),
            workspace: Some(root.clone()),
            source_package: image::DEFAULT_SOURCE_PACKAGE.into(),
            fragment: None,
            jobs: 2,
            force: false,
        };
        let report = image::build(&opts).unwrap_or_else(|e| panic!("guest image: {e:?}"));
        Fixture {
            vmm: carapace_tests::workspace_bin("carapace-vmm"),
            fsd: carapace_tests::workspace_bin("carapace-fsd"),
            kernel: report.kernel,
            initrd: report.initramfs,
        }
    }

    fn lab(&self) -> Lab {
        Lab::new()
            .mem_mib(2048)
            .timeout(Duration::from_secs(900))
            .env(ENV_VMM, self.vmm.display().to_string())
            .env(ENV_KERNEL, self.kernel.display().to_string())
            .env(ENV_INITRD, self.initrd.display().to_string())
            .env(ENV_FSD, self.fsd.display().to_string())
    }
}

/// A running carapace-vmm with its serial log, vsock and API sockets in a temp dir.
struct Vmm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vmm {
    fn start(f: &Fixture, dir: tempfile::TempDir, items: &str, extra: &[&str]) -> Self {
        let d = dir.path();
        let mut c = Command::new(&f.vmm);
        c.arg("--kernel")
            .arg(&f.kernel)
            .arg("--initrd")
            .arg(&f.initrd)
            .args(["--memory-mib", "256"])
            .arg("--serial")
            .arg(format!("file:{}", d.join("serial.log").display()))
            .arg("--vsock-uds")
            .arg(d.join("v.sock"))
            .arg("--api-socket")
            .arg(d.join("api.sock"))
            .arg("--cmdline")
            .arg(format!("quiet vmmtest={items}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("vmm.log")).expect("vmm log"));
        Vmm {
            child: c.spawn().expect("spawn carapace-vmm"),
            dir,
        }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vmm.log")).unwrap_or_default()
    }

    fn wait_serial(&mut self, needle: &str) {
        let t = Instant::now();
        while t.elapsed() < BOOT_DEADLINE {
            if self.serial().contains(needle) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "VMM exited ({st}) before {needle:?}\nserial:\n{}\nvmm:\n{}",
                    self.serial(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no {needle:?} in time\nserial:\n{}\nvmm:\n{}",
            self.serial(),
            self.log()
        );
    }

    fn wait_exit(&mut self, within: Duration) -> i32 {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!(
            "VMM did not exit\nserial:\n{}\nvmm:\n{}",
            self.serial(),
            self.log()
        );
    }

    fn api(&self, req: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(self.dir.path().join("api.sock")).expect("api connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("api timeout");
        s.write_all(format!("{req}\n").as_bytes())
            .expect("api write");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("api read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("api answer {line:?}: {e}"))
    }

    /// Host-initiated hybrid vsock stream to guest `port`.
    fn connect(&self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(self.dir.path().join("v.sock")).expect("vsock connect");
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("CONNECT");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            assert_eq!(
                s.read(&mut b).expect("handshake read"),
                1,
                "closed in handshake"
            );
            line.push(b[0]);
        }
        let line = String::from_utf8(line).expect("utf8");
        assert!(line.starts_with("OK "), "handshake answer {line:?}");
        s
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` on one thread while reading the echo on this one.
fn echo(mut s: UnixStream, data: Vec<u8>) -> bool {
    let mut w = s.try_clone().expect("clone");
    let n = data.len();
    let expect = fnv1a(&data);
    let writer = std::thread::spawn(move || w.write_all(&data).is_ok());
    let mut got = vec![0u8; n];
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    let ok = s.read_exact(&mut got).is_ok();
    writer.join().expect("writer") && ok && fnv1a(&got) == expect
}

fn devices_and_vsock(f: &Fixture) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    let content = pattern(1 << 20, 42);
    std::fs::write(&disk, &content).expect("disk image");
    // Guest-initiated stream target: <uds>_5000.
    let host = UnixListener::bind(dir.path().join("v.sock_5000")).expect("bind _5000");
    let server = std::thread::spawn(move || {
        let (mut s, _) = host.accept().expect("guest dial");
        let mut line = String::new();
        BufReader::new(s.try_clone().expect("clone"))
            .read_line(&mut line)
            .expect("hello");
        s.write_all(b"hi guest\n").expect("reply");
        line
    });
    let disk_arg = format!("{},ro", disk.display());
    let mut vm = Vmm::start(
        f,
        dir,
        "blk,rng,dial=5000,echo",
        &["--block", &disk_arg, "--rng"],
    );
    vm.wait_serial("echo server on vsock");
    let serial = vm.serial();
    assert!(serial.contains("vmm-guest-test: ready"), "{serial}");
    assert!(
        serial.contains(&format!(
            "blk len={} fnv={:016x}",
            content.len(),
            fnv1a(&content)
        )),
        "block device content differs:\n{serial}"
    );
    assert!(
        serial.contains("blk write failed"),
        "read-only disk was writable:\n{serial}"
    );
    assert!(serial.contains("rng ok nonzero=true"), "{serial}");
    assert!(serial.contains("dial reply hi guest"), "{serial}");
    assert_eq!(server.join().expect("server"), "hello 5000\n");

    let info = vm.api(r#"{"cmd":"info"}"#);
    assert_eq!(info["ok"], true, "{info}");
    assert!(
        info["boot_done_ms"].as_f64().is_some(),
        "no boot-done time: {info}"
    );

    // 64 concurrent streams, 256 KiB each, both directions at once.
    let streams: Vec<_> = (0..64)
        .map(|i| {
            let s = vm.connect(1024);
            std::thread::spawn(move || echo(s, pattern(256 << 10, i + 1)))
        })
        .collect();
    for (i, t) in streams.into_iter().enumerate() {
        assert!(t.join().expect("stream thread"), "stream {i} echo mismatch");
    }
    // One 16 MiB payload.
    assert!(
        echo(vm.connect(1024), pattern(16 << 20, 7)),
        "16 MiB echo mismatch"
    );

    let m = vm.api(r#"{"cmd":"metrics"}"#);
    let vs = &m["devices"]["vsock"]["device"];
    assert!(vs["rx_bytes"].as_u64().unwrap_or(0) >= (32 << 20), "{m}");
    assert_eq!(vs["bad_packets"], 0, "{m}");

    let mut c = vm.connect(1025);
    c.write_all(b"poweroff\n").expect("poweroff");
    let code = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(code, 0, "power-off exit code\nvmm:\n{}", vm.log());
}

#[test]
fn vmm_devices_vsock_and_poweroff() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_devices_vsock_and_poweroff",
        f.lab(),
        || devices_and_vsock(&f),
    );
}

fn reboot_and_api(f: &Fixture) {
    // Guest reboot: exit code 32.
    let mut vm = Vmm::start(f, tempfile::tempdir().expect("tempdir"), "reboot", &[]);
    assert_eq!(
        vm.wait_exit(BOOT_DEADLINE),
        32,
        "reboot exit code\n{}",
        vm.log()
    );
    assert!(
        vm.log().contains("guest reported boot done"),
        "{}",
        vm.log()
    );

    // API: pause, resume, shutdown with no grace forces the VM off with exit code 0. The
    // guest's clock (kvmclock) keeps the host's time across a pause: after 3 s paused the
    // guest does not lag behind by them.
    let mut vm = Vmm::start(f, tempfile::tempdir().expect("tempdir"), "echo,clock", &[]);
    vm.wait_serial("echo server on vsock");
    vm.wait_serial("clock ");
    assert_eq!(vm.api(r#"{"cmd":"pause"}"#)["state"], "paused");
    assert_eq!(vm.api(r#"{"cmd":"info"}"#)["state"], "paused");
    std::thread::sleep(Duration::from_secs(3));
    let before_resume = vm.serial().len();
    assert_eq!(vm.api(r#"{"cmd":"resume"}"#)["state"], "running");
    let start = std::time::Instant::now();
    let guest_now = loop {
        let serial = vm.serial();
        let line = serial
            .get(before_resume..)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("clock ").map(|(_, t)| t.trim()))
            .find_map(|t| t.parse::<f64>().ok());
        if let Some(t) = line {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no clock line after resume\n{serial}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("host clock")
        .as_secs_f64();
    println!("after a 3 s pause: guest clock {guest_now:.3}, host {host_now:.3}");
    assert!(
        (host_now - guest_now).abs() < 2.0,
        "guest clock {guest_now:.3} vs host {host_now:.3} after a 3 s pause"
    );
    assert!(
        echo(vm.connect(1024), pattern(1000, 3)),
        "echo after resume"
    );
    let bad = vm.api(r#"{"cmd":"launch-missiles"}"#);
    assert_eq!(bad["ok"], false, "{bad}");
    let r = vm.api(r#"{"cmd":"shutdown","grace_secs":0}"#);
    assert_eq!(r["forced"], true, "{r}");
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0);
}

#[test]
fn vmm_reboot_exit_code_and_control_api() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_reboot_exit_code_and_control_api",
        f.lab(),
        || reboot_and_api(&f),
    );
}

/// On a host whose KVM cannot boot Linux the VMM refuses clearly (exit code 3).
#[test]
fn vmm_refuses_software_kvm() {
    if carapace_tests::lab::host_can_boot_guests() || std::env::var_os(ENV_VMM).is_some() {
        return;
    }
    let f = Fixture::get();
    let out = Command::new(&f.vmm)
        .arg("--kernel")
        .arg(&f.kernel)
        .output()
        .expect("run carapace-vmm");
    let err = String::from_utf8_lossy(&out.stderr);
    if !Path::new("/dev/kvm").exists() {
        assert!(err.contains("/dev/kvm does not exist"), "{err}");
    } else {
        assert!(err.contains("cannot run a Linux guest"), "{err}");
    }
    assert_eq!(out.status.code(), Some(3), "{err}");
}

fn virtiofsd() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    [
        home.join(".cargo/bin/virtiofsd"),
        "/usr/libexec/virtiofsd".into(),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Reads a file through virtio-fs served by `daemon` (vhost-user backend); `extra` goes to
/// the daemon, `vm_extra` to the VMM.
fn fs_read_through(f: &Fixture, daemon: &Path, extra: &[&str], vm_extra: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("shared dir");
    std::fs::write(shared.join("hello.txt"), "hello from the host\n").expect("file");
    let sock = dir.path().join("fs.sock");
    let mut fsd = Command::new(daemon)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&shared)
        .args(extra)
        .stderr(std::fs::File::create(dir.path().join("backend.log")).expect("log"))
        .spawn()
        .expect("spawn the vhost-user backend");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let fs_arg = format!("myfs={}", sock.display());
    let vm_dir = tempfile::tempdir().expect("tempdir");
    let mut vm_args = vec!["--fs", &fs_arg];
    vm_args.extend_from_slice(vm_extra);
    let mut vm = Vmm::start(f, vm_dir, "fs=myfs,poweroff", &vm_args);
    let code = vm.wait_exit(BOOT_DEADLINE);
    let _ = fsd.kill();
    let _ = fsd.wait();
    let serial = vm.serial();
    assert!(
        serial.contains("fs read hello from the host"),
        "virtio-fs read failed:\n{serial}\nvmm:\n{}\nbackend:\n{}",
        vm.log(),
        std::fs::read_to_string(dir.path().join("backend.log")).unwrap_or_default()
    );
    assert_eq!(code, 0, "{}", vm.log());
}

#[test]
fn vmm_virtio_fs_with_virtiofsd() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_virtio_fs_with_virtiofsd",
        f.lab(),
        || {
            let daemon = virtiofsd()
                .expect("virtiofsd is not installed (scripts/setup.sh installs it with cargo)");
            fs_read_through(&f, &daemon, &["--sandbox", "none", "--cache", "never"], &[]);
        },
    );
}

#[test]
fn vmm_virtio_fs_with_carapace_fsd() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_virtio_fs_with_carapace_fsd",
        f.lab(),
        || {
            fs_read_through(&f, &f.fsd, &[], &[]);
        },
    );
}

/// With memory hot-plug the vhost-user backend gets a memory table with the (memfd-backed)
/// hot-plug region too, and serves the guest as before.
#[test]
fn vmm_virtio_mem_with_vhost_user_fs() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_virtio_mem_with_vhost_user_fs",
        f.lab(),
        || {
            fs_read_through(&f, &f.fsd, &[], &["--memory-hotplug", "512"]);
        },
    );
}

fn ip_cmd() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| "ip".into())
}

fn ip(args: &[&str]) {
    let out = Command::new(ip_cmd())
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host tap with an address; deleted on drop, also when the test fails.
struct TapGuard {
    name: String,
}

impl TapGuard {
    fn create(name: &str, host_cidr: &str) -> Self {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let g = TapGuard { name: name.into() };
        ip(&["addr", "add", host_cidr, "dev", name]);
        ip(&["link", "set", "dev", name, "up"]);
        g
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new(ip_cmd())
            .args(["link", "del", "dev", &self.name])
            .status();
    }
}

#[repr(C)]
struct TunIfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tun_set_iff, 0x4004_54ca, TunIfReq);

/// Opens a queue of tap `name` as a caller would hand it to the VMM: inheritable (no
/// O_CLOEXEC), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
fn open_tap_fd(name: &str) -> std::os::fd::RawFd {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let fd = open("/dev/net/tun", OFlag::O_RDWR, Mode::empty()).expect("open /dev/net/tun");
    let mut req = TunIfReq {
        name: [0; 16],
        flags: 0x0002 | 0x1000 | 0x4000,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `fd` is the tun control device just opened and `req` a live ifreq-sized
    // struct that TUNSETIFF reads during the call.
    unsafe { tun_set_iff(fd, &req) }.expect("TUNSETIFF");
    fd
}

/// What a NIC test expects of the device.
#[derive(Clone, Copy)]
struct NetCase {
    /// Bytes echoed.
    bytes: usize,
    /// `vhost=on`: the host kernel moves the frames.
    vhost: bool,
}

fn net_both_ways(f: &Fixture, case: NetCase) {
    assert!(carapace_tests::is_root(), "needs root (creates a tap)");
    let name = format!("cvmt{}", std::process::id() % 100_000);
    let tap = TapGuard::create(&name, "10.213.77.1/24");
    let vhost = if case.vhost { ",vhost=on" } else { "" };
    // By name (the VMM attaches to the tap) ...
    net_echo(
        f,
        &name,
        &format!("tap={name},mac=52:54:00:12:34:56{vhost}"),
        case,
    );
    // ... and through a descriptor opened by the caller, with a virtio-net header.
    let fd = open_tap_fd(&tap.name);
    net_echo(
        f,
        &name,
        &format!("fd={fd},mac=52:54:00:12:34:56{vhost}"),
        case,
    );
    let _ = nix::unistd::close(fd);
}

fn net_echo(f: &Fixture, name: &str, net_arg: &str, case: NetCase) {
    let mut vm = Vmm::start(
        f,
        tempfile::tempdir().expect("tempdir"),
        "net=10.213.77.2/24",
        &["--net", net_arg],
    );
    // Up to the line's last words: the console may be read while the guest is half-way
    // through the line.
    vm.wait_serial("net up 10.213.77.2/24, tcp echo on 7777");
    // Host -> guest SYN, guest -> host SYN-ACK (after ARP both ways), then data both ways.
    let addr: std::net::SocketAddr = "10.213.77.2:7777".parse().expect("addr");
    let t = Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if t.elapsed() < Duration::from_secs(120) => {
                eprintln!("connect to guest: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!(
                "cannot connect to the guest over the tap: {e}\nmetrics: {}\nserial:\n{}\nvmm:\n{}",
                vm.api(r#"{"cmd":"metrics"}"#),
                vm.serial(),
                vm.log()
            ),
        }
    };
    let data = pattern(case.bytes, 11);
    let expect = fnv1a(&data);
    let mut w = s.try_clone().expect("clone");
    // Every wait is bounded: a stalled echo fails with the device counters and both logs
    // instead of hanging until the lab's own deadline.
    w.set_write_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let writer = std::thread::spawn(move || w.write_all(&data).map_err(|e| e.to_string()));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = vec![0u8; case.bytes];
    let (mut have, t) = (0usize, Instant::now());
    while have < got.len() {
        match s.read(&mut got[have..]) {
            Ok(0) => panic!("guest closed the echo after {have} bytes"),
            Ok(n) => have += n,
            Err(e)
                if t.elapsed() < ECHO_DEADLINE
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
            Err(e) => panic!(
                "echo over the tap stalled after {have} of {} bytes ({e}, {:?})\nmetrics: {}\nserial:\n{}\nvmm:\n{}",
                got.len(),
                t.elapsed(),
                vm.api(r#"{"cmd":"metrics"}"#),
                vm.serial(),
                vm.log()
            ),
        }
    }
    let took = t.elapsed();
    let _ = s.shutdown(std::net::Shutdown::Both);
    writer
        .join()
        .expect("writer")
        .unwrap_or_else(|e| panic!("write to the guest: {e}"));
    assert_eq!(fnv1a(&got), expect, "echo over the tap differs");
    drop(s);

    let m = vm.api(r#"{"cmd":"metrics"}"#);
    let n = &m["devices"]["net0"]["device"];
    eprintln!(
        "{net_arg}: {} bytes echoed in {took:?} ({:.1} Mbit/s each way); device {n}",
        case.bytes,
        case.bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    assert_eq!(n["tap"], name, "{m}");
    // The guest accepted the offloads: checksum and TSO both ways (bits 0, 1, 7, 11), and
    // mergeable RX buffers (15); the tap got TUN_F_CSUM | TSO4 | TSO6 | TSO_ECN.
    let features = n["features"].as_u64().unwrap_or(0);
    for bit in [0, 1, 7, 11, 15] {
        assert!(
            features & (1 << bit) != 0,
            "feature bit {bit} not negotiated: {m}"
        );
    }
    assert_eq!(n["tap_offloads"], 0xf, "{m}");
    if case.vhost {
        assert_eq!(n["backend"], "vhost-net", "{m}");
        // The kernel moved the frames; the guest's interrupts came through our relay.
        assert!(n["vhost_interrupts"].as_u64().unwrap_or(0) > 0, "{m}");
        assert_eq!(n["rx_frames"], 0, "{m}");
    } else {
        assert_eq!(n["backend"], "userspace", "{m}");
        assert!(
            n["rx_bytes"].as_u64().unwrap_or(0) >= case.bytes as u64,
            "{m}"
        );
        assert!(
            n["tx_bytes"].as_u64().unwrap_or(0) >= case.bytes as u64,
            "{m}"
        );
        assert_eq!(n["tx_bad"], 0, "{m}");
        assert_eq!(n["tx_bad_hdr"], 0, "{m}");
        // GSO frames both ways: the host's TCP handed the tap 64 KiB segments for the
        // guest, the guest's TCP handed us its own (TSO), all checked byte for byte above.
        assert!(n["rx_gso_frames"].as_u64().unwrap_or(0) > 0, "{m}");
        assert!(n["tx_gso_frames"].as_u64().unwrap_or(0) > 0, "{m}");
        assert!(
            n["rx_buffers"].as_u64().unwrap_or(0) > n["rx_frames"].as_u64().unwrap_or(0),
            "GSO frames spread over several mergeable buffers: {m}"
        );
    }
    let r = vm.api(r#"{"cmd":"shutdown","grace_secs":0}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.log());
}

/// virtio-net on a tap the test creates, frames moved by the VMM: a 16 MiB TCP echo
/// between the host and the guest with checksum/TSO offloads and mergeable buffers in use
/// (GSO frames counted both ways), byte-exact.
#[test]
fn vmm_virtio_net_tap() {
    let f = Fixture::get();
    in_kvm(module_path!(), "vmm_virtio_net_tap", f.lab(), || {
        net_both_ways(
            &f,
            NetCase {
                bytes: 16 << 20,
                vhost: false,
            },
        )
    });
}

/// The same through the host kernel's vhost-net (`vhost=on`): the tap by name and by
/// descriptor, offloads negotiated, interrupts relayed, byte-exact.
#[test]
fn vmm_virtio_net_vhost() {
    let f = Fixture::get();
    in_kvm(module_path!(), "vmm_virtio_net_vhost", f.lab(), || {
        net_both_ways(
            &f,
            NetCase {
                bytes: 16 << 20,
                vhost: true,
            },
        )
    });
}

/// A few 32-bit protected-mode instructions (the PVH entry state: flat segments, no paging),
/// enough for a bare guest that drives a virtio-mmio device by hand.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// mov dword [addr], v
    fn st32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.bytes(&[0xc7, 0x05])
            .bytes(&addr.to_le_bytes())
            .bytes(&v.to_le_bytes())
    }
    /// mov word [addr], v
    fn st16(&mut self, addr: u32, v: u16) -> &mut Self {
        self.bytes(&[0x66, 0xc7, 0x05])
            .bytes(&addr.to_le_bytes())
            .bytes(&v.to_le_bytes())
    }
    /// A split-ring descriptor at `table + 16 * i`.
    fn desc(
        &mut self,
        table: u32,
        i: u32,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let d = table + 16 * i;
        self.st32(d, addr as u32)
            .st32(d + 4, (addr >> 32) as u32)
            .st32(d + 8, len)
            .st16(d + 12, flags)
            .st16(d + 14, next)
    }
    /// mov dx, port; mov al, v; out dx, al
    fn outb(&mut self, port: u16, v: u8) -> &mut Self {
        self.bytes(&[0x66, 0xba])
            .bytes(&port.to_le_bytes())
            .bytes(&[0xb0, v, 0xee])
    }
    fn print(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.outb(0x3f8, b);
        }
        self
    }
    /// Spins (at most `tries` times) until the 16-bit word at `addr` equals `v`.
    fn wait_word(&mut self, addr: u32, v: u16, tries: u32) -> &mut Self {
        // mov ecx, tries; L: movzx eax, word [addr]; cmp eax, v; je +3; dec ecx; jnz L
        self.bytes(&[0xb9])
            .bytes(&tries.to_le_bytes())
            .bytes(&[0x0f, 0xb7, 0x05])
            .bytes(&addr.to_le_bytes())
            .bytes(&[0x3d])
            .bytes(&u32::from(v).to_le_bytes())
            .bytes(&[0x74, 0x03, 0x49, 0x75, 0xef])
    }
    /// Spins (at most `tries` times) until the dword at `addr` has a bit of `mask` set.
    fn wait_bits(&mut self, addr: u32, mask: u32, tries: u32) -> &mut Self {
        // mov ecx, tries; L: mov eax, [addr]; test eax, mask; jnz +3; dec ecx; jnz L
        self.bytes(&[0xb9])
            .bytes(&tries.to_le_bytes())
            .bytes(&[0xa1])
            .bytes(&addr.to_le_bytes())
            .bytes(&[0xa9])
            .bytes(&mask.to_le_bytes())
            .bytes(&[0x75, 0x03, 0x49, 0x75, 0xf1])
    }
    /// Prints `yes` when the dword at `addr` has a bit of `mask` set, else `no` (one byte).
    fn print_bits(&mut self, addr: u32, mask: u32, yes: u8, no: u8) -> &mut Self {
        // mov eax, [addr]; test eax, mask; mov al, no; jz +2; mov al, yes; mov dx, 0x3f8; out
        self.bytes(&[0xa1])
            .bytes(&addr.to_le_bytes())
            .bytes(&[0xa9])
            .bytes(&mask.to_le_bytes())
            .bytes(&[
                0xb0, no, 0x74, 0x02, 0xb0, yes, 0x66, 0xba, 0xf8, 0x03, 0xee,
            ])
    }
    /// Prints `yes` when the 16-bit word at `addr` equals `v`, else `no`.
    fn print_word_eq(&mut self, addr: u32, v: u16, yes: u8, no: u8) -> &mut Self {
        // movzx eax, word [addr]; cmp eax, v; mov al, no; jne +2; mov al, yes; out
        self.bytes(&[0x0f, 0xb7, 0x05])
            .bytes(&addr.to_le_bytes())
            .bytes(&[0x3d])
            .bytes(&u32::from(v).to_le_bytes())
            .bytes(&[
                0xb0, no, 0x75, 0x02, 0xb0, yes, 0x66, 0xba, 0xf8, 0x03, 0xee,
            ])
    }
    /// The virtio-mmio driver sequence up to DRIVER_OK for queue 0 of size 16.
    fn virtio_init(&mut self, base: u32, desc: u64, avail: u64, used: u64) -> &mut Self {
        self.st32(base + 0x70, 0)
            .st32(base + 0x70, 1)
            .st32(base + 0x70, 3)
            .st32(base + 0x24, 1)
            .st32(base + 0x20, 1) // VIRTIO_F_VERSION_1 (bit 32)
            .st32(base + 0x24, 0)
            .st32(base + 0x20, 0)
            .st32(base + 0x70, 0xb) // FEATURES_OK
            .st32(base + 0x30, 0)
            .st32(base + 0x38, 16);
        for (off, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            self.st32(base + off, a as u32)
                .st32(base + off + 4, (a >> 32) as u32);
        }
        self.st32(base + 0x44, 1).st32(base + 0x70, 0xf) // DRIVER_OK
    }
}

/// PVH ELF64 with one PT_LOAD of `code` at `paddr` and the Xen PVH entry note.
fn pvh_elf(code: &[u8], paddr: u64) -> Vec<u8> {
    let (eh, ph) = (64usize, 56usize);
    let note_off = eh + 2 * ph;
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes()); // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(paddr as u32).to_le_bytes());
    let code_off = (note_off + note.len()).next_multiple_of(16);
    let mut f = vec![0u8; code_off];
    f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&(eh as u64).to_le_bytes());
    f[52..54].copy_from_slice(&(eh as u16).to_le_bytes());
    f[54..56].copy_from_slice(&(ph as u16).to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes());
    for (i, (ty, off, addr, len)) in [
        (1u32, code_off, paddr, code.len()),
        (4, note_off, 0, note.len()),
    ]
    .into_iter()
    .enumerate()
    {
        let b = eh + i * ph;
        f[b..b + 4].copy_from_slice(&ty.to_le_bytes());
        f[b + 4..b + 8].copy_from_slice(&5u32.to_le_bytes());
        f[b + 8..b + 16].copy_from_slice(&(off as u64).to_le_bytes());
        f[b + 16..b + 24].copy_from_slice(&addr.to_le_bytes());
        f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes());
        f[b + 32..b + 40].copy_from_slice(&(len as u64).to_le_bytes());
        f[b + 40..b + 48].copy_from_slice(&(len as u64).to_le_bytes());
        f[b + 48..b + 56].copy_from_slice(&4u64.to_le_bytes());
    }
    f[note_off..note_off + note.len()].copy_from_slice(&note);
    f.extend_from_slice(code);
    f
}

/// The bare guest: drives the virtio-rng device (the only one, at 0xd0000000) with
/// malformed descriptors, changes the queue after DRIVER_OK, publishes an impossible
/// available index, then restarts the device with rings outside guest memory.
/// Serial output: `used:<U> fail:<F> ring:<R>\n` with one letter each (upper case = as
/// expected), then the boot-done marker; the guest then halts with interrupts off.
fn bad_virtio_guest() -> Vec<u8> {
    const MMIO: u32 = 0xd000_0000;
    const DESC: u32 = 0x20_0000;
    const AVAIL: u32 = 0x20_1000;
    const USED: u32 = 0x20_2000;
    const BUF: u64 = 0x30_0000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let mut a = Asm::default();
    a.virtio_init(MMIO, DESC.into(), AVAIL.into(), USED.into())
        // chain 0: a descriptor loop 0 -> 1 -> 0
        .desc(DESC, 0, BUF, 64, NEXT | WRITE, 1)
        .desc(DESC, 1, BUF + 0x1000, 64, NEXT | WRITE, 0)
        // chain 2: a buffer far outside guest memory
        .desc(DESC, 2, 0x10_0000_0000, 64, WRITE, 0)
        // chain 3: a 4 GiB length
        .desc(DESC, 3, BUF, u32::MAX, WRITE, 0)
        // chain 4: a read-only buffer (nothing the device may write)
        .desc(DESC, 4, BUF, 64, 0, 0)
        // chain 5: a good one
        .desc(DESC, 5, BUF, 32, WRITE, 0);
    for (i, head) in [0u16, 2, 3, 4, 5].into_iter().enumerate() {
        a.st16(AVAIL + 4 + 2 * i as u32, head);
    }
    a.st16(AVAIL, 0)
        .st16(AVAIL + 2, 5)
        .st32(MMIO + 0x50, 0) // QueueNotify (an ioeventfd)
        .wait_word(USED + 2, 5, 0x4000_0000)
        .print("used:")
        .print_word_eq(USED + 2, 5, b'Y', b'n')
        // queue registers after DRIVER_OK: ignored
        .st32(MMIO + 0x30, 0)
        .st32(MMIO + 0x38, 8)
        .st32(MMIO + 0x80, 0x7000_0000)
        .st32(MMIO + 0x44, 0)
        // an available index 1000 entries ahead of a 16-entry queue
        .st16(AVAIL + 2, 1005)
        .st32(MMIO + 0x50, 0)
        .wait_bits(MMIO + 0x70, 0x40, 200_000)
        .print(" fail:")
        .print_bits(MMIO + 0x70, 0x40, b'Y', b'n')
        // reset and restart with the descriptor table outside guest memory
        .virtio_init(MMIO, 0x7000_0000, AVAIL.into(), USED.into())
        .print(" ring:")
        .print_bits(MMIO + 0x70, 0x40, b'Y', b'n')
        .print("\n")
        .outb(0x3f0, 123)
        .bytes(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp hlt
    a.0
}

fn malformed_virtio_guest(f: &Fixture) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("bad-virtio.elf");
    std::fs::write(&kernel, pvh_elf(&bad_virtio_guest(), 0x100_0000)).expect("guest ELF");
    let child = Command::new(&f.vmm)
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "64", "--rng"])
        .arg("--serial")
        .arg(format!("file:{}", d.join("serial.log").display()))
        .arg("--api-socket")
        .arg(d.join("api.sock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("vmm.log")).expect("vmm log"))
        .spawn()
        .expect("spawn carapace-vmm");
    let mut vm = Vmm { child, dir };
    vm.wait_serial("ring:");
    let t = Instant::now();
    while !vm.serial().ends_with('\n') && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        vm.serial(),
        "used:Y fail:Y ring:Y\n",
        "bare guest result (n = not as expected)\nvmm:\n{}",
        vm.log()
    );
    let info = vm.api(r#"{"cmd":"info"}"#);
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["state"], "running", "{info}");
    let m = vm.api(r#"{"cmd":"metrics"}"#);
    let rng = &m["devices"]["rng"];
    assert_eq!(rng["status"].as_u64().unwrap_or(0) & 0x40, 0x40, "{m}");
    assert_eq!(rng["transport"]["failed_activations"], 1, "{m}");
    assert!(
        rng["transport"]["refused_writes"].as_u64().unwrap_or(0) >= 3,
        "{m}"
    );
    assert_eq!(rng["device"]["requests"], 5, "{m}");
    assert!(
        rng["device"]["bad_requests"].as_u64().unwrap_or(0) >= 2,
        "{m}"
    );
    assert!(
        vm.log().contains("virtio device needs reset"),
        "{}",
        vm.log()
    );
    let r = vm.api(r#"{"cmd":"shutdown","grace_secs":0}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.log());
}

/// A bare (non-Linux) guest sends malformed descriptors and misprograms the transport; the
/// device reports DEVICE_NEEDS_RESET, the VMM keeps serving its API and shuts down cleanly.
#[test]
fn vmm_survives_malformed_virtio_guest() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_survives_malformed_virtio_guest",
        f.lab(),
        || malformed_virtio_guest(&f),
    );
}

fn two_vcpus(f: &Fixture) {
    let mut vm = Vmm::start(
        f,
        tempfile::tempdir().expect("tempdir"),
        "cpus,poweroff",
        &["--vcpus", "2"],
    );
    vm.wait_serial("vmm-guest-test: cpus");
    let code = vm.wait_exit(BOOT_DEADLINE);
    let serial = vm.serial();
    assert!(
        serial.contains("cpus online=0-1 usable=2"),
        "guest does not see 2 online CPUs:\n{serial}\nvmm:\n{}",
        vm.log()
    );
    assert_eq!(code, 0, "{}", vm.log());
}

/// Two vCPUs (MP table, per-vCPU APIC ids): the guest brings both online.
#[test]
fn vmm_two_vcpus_online() {
    let f = Fixture::get();
    in_kvm(module_path!(), "vmm_two_vcpus_online", f.lab(), || {
        two_vcpus(&f)
    });
}

/// The last `mem total_kib=N` the guest printed, and whether `mem touched_mib=` follows it.
fn guest_mem_total(serial: &str) -> Option<(u64, bool)> {
    let lines: Vec<&str> = serial.lines().collect();
    let i = lines
        .iter()
        .rposition(|l| l.contains("vmm-guest-test: mem total_kib="))?;
    let kib = lines[i]
        .rsplit_once('=')
        .and_then(|(_, n)| n.trim().parse().ok())?;
    let touched = lines[i..].iter().any(|l| l.contains("mem touched_mib="));
    Some((kib, touched))
}

/// The VMM process's resident memory (KiB).
fn rss_kib(vm: &Vmm) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id()))
        .expect("VMM /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Polls `info` until `memory_hotplug.plugged_mib` is `want`, or has not moved for 30 s, or
/// `deadline` passed; returns the last value.
fn wait_plugged(vm: &Vmm, want: u64, deadline: Duration) -> u64 {
    let t = Instant::now();
    let (mut last, mut moved) = (u64::MAX, Instant::now());
    loop {
        let info = vm.api(r#"{"cmd":"info"}"#);
        let p = info["memory_hotplug"]["plugged_mib"]
            .as_u64()
            .unwrap_or_else(|| panic!("no plugged_mib in {info}"));
        if p == want || t.elapsed() > deadline || moved.elapsed() > Duration::from_secs(30) {
            return p;
        }
        if p != last {
            (last, moved) = (p, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the guest's last MemTotal satisfies `ok` (and, with `touched`, the guest
/// used the new memory after printing it).
fn wait_guest_total(vm: &mut Vmm, touched: bool, ok: impl Fn(u64) -> bool) -> u64 {
    let t = Instant::now();
    while t.elapsed() < BOOT_DEADLINE {
        if let Some((kib, t)) = guest_mem_total(&vm.serial())
            && ok(kib)
            && (t || !touched)
        {
            return kib;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "guest MemTotal never got there\nserial:\n{}\nvmm:\n{}",
        vm.serial(),
        vm.log()
    );
}

/// virtio-mem: 256 MiB of RAM and a 512 MiB hot-plug region; the API asks for 256 MiB, the
/// guest driver plugs them, the kernel onlines them (MemTotal grows) and the guest uses
/// them; then the API asks for 0, the guest unplugs (the memory is in ZONE_MOVABLE with
/// auto-movable, and free again) and the VMM gives it back to the host (its RSS drops).
fn virtio_mem(f: &Fixture) {
    let mut vm = Vmm::start(
        f,
        tempfile::tempdir().expect("tempdir"),
        "mem",
        &["--memory-hotplug", "512"],
    );
    vm.wait_serial("vmm-guest-test: mem total_kib=");
    let (base_kib, _) = guest_mem_total(&vm.serial()).expect("MemTotal");
    let info = vm.api(r#"{"cmd":"info"}"#);
    assert_eq!(
        info["memory_hotplug"],
        serde_json::json!({"block_mib": 2, "plugged_mib": 0, "region_mib": 512, "requested_mib": 0}),
        "{info}"
    );
    let cmdline = info["cmdline"].as_str().unwrap_or_default();
    assert!(
        cmdline.contains("memhp_default_state=online memory_hotplug.online_policy=auto-movable"),
        "{cmdline}"
    );
    let mem_dev = info["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "mem"));
    assert!(mem_dev.is_some(), "{info}");
    for (n, why) in [(3, "multiple of block_mib"), (1024, "exceeds region_mib")] {
        let r = vm.api(&format!(r#"{{"cmd":"memory","requested_mib":{n}}}"#));
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap_or_default().contains(why), "{r}");
    }
    let rss_before = rss_kib(&vm);

    let t = Instant::now();
    let r = vm.api(r#"{"cmd":"memory","requested_mib":256}"#);
    assert_eq!(
        r,
        serde_json::json!({"ok": true, "block_mib": 2, "requested_mib": 256, "plugged_mib": 0, "region_mib": 512}),
    );
    let plugged = wait_plugged(&vm, 256, Duration::from_secs(180));
    let plug_time = t.elapsed();
    assert_eq!(plugged, 256, "serial:\n{}\nvmm:\n{}", vm.serial(), vm.log());
    let grown_kib = wait_guest_total(&mut vm, true, |k| k >= base_kib + 250 * 1024);
    assert!(
        grown_kib <= base_kib + 256 * 1024,
        "{base_kib} -> {grown_kib}"
    );
    let rss_plugged = rss_kib(&vm);

    let t = Instant::now();
    let r = vm.api(r#"{"cmd":"memory","requested_mib":0}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["requested_mib"], 0, "{r}");
    let plugged = wait_plugged(&vm, 0, Duration::from_secs(180));
    let unplug_time = t.elapsed();
    // Everything comes back: the hot-plugged memory is all in ZONE_MOVABLE (auto-movable)
    // and the guest freed what it used.
    assert_eq!(plugged, 0, "serial:\n{}\nvmm:\n{}", vm.serial(), vm.log());
    let shrunk_kib = wait_guest_total(&mut vm, false, |k| k <= base_kib + 1024);
    let rss_after = rss_kib(&vm);
    eprintln!(
        "virtio-mem: guest MemTotal {base_kib} -> {grown_kib} -> {shrunk_kib} KiB; plug 256 MiB \
         in {plug_time:?}, unplug in {unplug_time:?}; VMM RSS {rss_before} -> {rss_plugged} -> \
         {rss_after} KiB"
    );
    assert!(
        rss_plugged >= rss_before + 128 * 1024,
        "the guest's use of the new memory did not show: RSS {rss_before} -> {rss_plugged} KiB"
    );
    assert!(
        rss_after + 128 * 1024 <= rss_plugged,
        "unplugged memory was not given back: RSS {rss_plugged} -> {rss_after} KiB"
    );
    let m = vm.api(r#"{"cmd":"metrics"}"#);
    let d = &m["devices"]["mem"]["device"];
    assert_eq!(d["errors"], 0, "{m}");
    assert_eq!(d["discard_failures"], 0, "{m}");
    assert!(
        d["discarded_bytes"].as_u64().unwrap_or(0) >= 256 << 20,
        "{m}"
    );
    let r = vm.api(r#"{"cmd":"shutdown","grace_secs":0}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.log());
}

/// Memory hot-plug and unplug with virtio-mem, seen from the guest and the host.
#[test]
fn vmm_virtio_mem_plug_and_unplug() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_virtio_mem_plug_and_unplug",
        f.lab(),
        || virtio_mem(&f),
    );
}

/// Free page reporting: the guest touches 128 MiB and frees it. With the balloon device the
/// guest reports the freed memory and the VMM gives it back (its RSS falls); without it,
/// the same guest doing the same leaves the VMM's RSS where it was (the control run, which
/// shows the fall comes from the device).
fn free_page_reporting(f: &Fixture) {
    const TOUCHED_MIB: u64 = 128;
    let touched_kib = TOUCHED_MIB * 1024;
    let run = |reporting: bool| {
        let extra: &[&str] = if reporting {
            &["--free-page-reporting"]
        } else {
            &[]
        };
        let mut vm = Vmm::start(
            f,
            tempfile::tempdir().expect("tempdir"),
            &format!("touch={TOUCHED_MIB}"),
            extra,
        );
        vm.wait_serial("touch freed");
        let freed = rss_kib(&vm);
        assert!(
            freed >= touched_kib,
            "the guest touched {TOUCHED_MIB} MiB but the VMM's RSS is {freed} KiB\nserial:\n{}",
            vm.serial()
        );
        // The guest reports free memory in batches, 2 s after enough of it gathered.
        let t = Instant::now();
        let wait = if reporting {
            Duration::from_secs(90)
        } else {
            Duration::from_secs(10)
        };
        let mut now = freed;
        while t.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(500));
            now = rss_kib(&vm);
            if reporting && now + touched_kib * 3 / 4 <= freed {
                break;
            }
        }
        let metrics = vm.api(r#"{"cmd":"metrics"}"#);
        let r = vm.api(r#"{"cmd":"shutdown","grace_secs":0}"#);
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.log());
        (freed, now, t.elapsed(), metrics)
    };

    let (freed, after, took, m) = run(true);
    eprintln!(
        "free page reporting: VMM RSS {freed} KiB after the guest freed {TOUCHED_MIB} MiB, \
         {after} KiB {took:?} later; balloon {}",
        m["devices"]["balloon"]["device"]
    );
    let d = &m["devices"]["balloon"]["device"];
    assert_eq!(d["bad_ranges"], 0, "{m}");
    assert_eq!(d["discard_failures"], 0, "{m}");
    assert!(
        d["reported_bytes"].as_u64().unwrap_or(0) >= (TOUCHED_MIB * 3 / 4) << 20,
        "{m}"
    );
    assert!(
        after + touched_kib * 3 / 4 <= freed,
        "freed guest memory was not given back: RSS {freed} -> {after} KiB in {took:?}"
    );

    let (freed, after, took, m) = run(false);
    eprintln!(
        "without free page reporting: VMM RSS {freed} KiB after the guest freed \
         {TOUCHED_MIB} MiB, {after} KiB {took:?} later"
    );
    assert!(m["devices"]["balloon"].is_null(), "{m}");
    assert!(
        after + touched_kib / 4 > freed,
        "RSS fell without the device ({freed} -> {after} KiB): the test cannot tell what \
         the device does"
    );
}

/// Free page reporting through virtio-balloon gives memory the guest freed back to the host.
#[test]
fn vmm_free_page_reporting() {
    let f = Fixture::get();
    in_kvm(module_path!(), "vmm_free_page_reporting", f.lab(), || {
        free_page_reporting(&f)
    });
}

/// API shutdown with a grace period presses Ctrl-Alt-Del on the guest's i8042 keyboard.
fn shutdown_asks_guest(f: &Fixture) {
    // The guest's init disabled the kernel's C-A-D restart: it gets SIGINT and powers off.
    let mut vm = Vmm::start(f, tempfile::tempdir().expect("tempdir"), "cad", &[]);
    vm.wait_serial("cad armed");
    let r = vm.api(r#"{"cmd":"shutdown","grace_secs":120}"#);
    assert_eq!(r["asked_guest"], true, "{r}");
    assert_eq!(
        r["forced"],
        false,
        "guest did not react\n{r}\n{}",
        vm.serial()
    );
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.log());
    let serial = vm.serial();
    assert!(serial.contains("ctrl-alt-del received"), "{serial}");
    assert!(serial.contains("vmm-guest-test: poweroff"), "{serial}");

    // An init that does not handle it: the kernel restarts at once; the VMM still exits 0.
    let mut vm = Vmm::start(f, tempfile::tempdir().expect("tempdir"), "echo", &[]);
    vm.wait_serial("echo server on vsock");
    let r = vm.api(r#"{"cmd":"shutdown","grace_secs":120}"#);
    assert_eq!(
        r["forced"],
        false,
        "guest did not react\n{r}\n{}",
        vm.serial()
    );
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.log());
    assert!(
        vm.log().contains("asking the guest to shut down"),
        "{}",
        vm.log()
    );

    // A guest that ignores the request is forced off after the grace period.
    let mut vm = Vmm::start(f, tempfile::tempdir().expect("tempdir"), "cad-ignore", &[]);
    vm.wait_serial("cad ignored");
    let r = vm.api(r#"{"cmd":"shutdown","grace_secs":3}"#);
    assert_eq!(r["asked_guest"], true, "{r}");
    assert_eq!(
        r["forced"],
        true,
        "{r}
{}",
        vm.serial()
    );
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), 0, "{}", vm.log());
    assert!(!vm.serial().contains("poweroff"), "{}", vm.serial());
}

#[test]
fn vmm_shutdown_asks_guest_with_ctrl_alt_del() {
    let f = Fixture::get();
    in_kvm(
        module_path!(),
        "vmm_shutdown_asks_guest_with_ctrl_alt_del",
        f.lab(),
        || shutdown_asks_guest(&f),
    );
}

/// A bzImage for the fallback boot path: Debian's cloud kernel from the guest-image cache
/// (tests/tests/guest_image.rs fetches it), else the lab's own Debian kernel, else the host's.
fn debian_bzimage() -> PathBuf {
    let mut candidates = vec![Path::new(image::DEFAULT_CACHE_DIR).join("reference/vmlinuz-cloud")];
    for dir in ["/var/cache/carapace-lab", "/boot"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .flat_map(|p| [p.join("vmlinuz"), p])
            .filter(|p| {
                p.is_file()
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
            })
            .collect();
        found.sort();
        candidates.extend(found);
    }
    candidates
        .into_iter()
        .find(|p| {
            let mut hdr = [0u8; 0x206];
            std::fs::File::open(p)
                .and_then(|mut f| f.read_exact(&mut hdr))
                .is_ok()
                && &hdr[0x202..0x206] == b"HdrS"
        })
        .expect(
            "no bzImage found (Debian cloud kernel in the guest-image cache, the lab kernel \
             in /var/cache/carapace-lab, or /boot/vmlinuz-*)",
        )
}

fn bzimage_boot(f: &Fixture) {
    let kernel = debian_bzimage();
    let bz = Fixture {
        kernel: kernel.clone(),
        ..f.clone()
    };
    let mut vm = Vmm::start(
        &bz,
        tempfile::tempdir().expect("tempdir"),
        "cpus,poweroff",
        &[],
    );
    // A stock distribution kernel probes far more than ours: allow a slow lab.
    let code = vm.wait_exit(Duration::from_secs(600));
    let serial = vm.serial();
    assert!(
        serial.contains("vmm-guest-test: ready") && serial.contains("cpus online=0"),
        "bzImage {} did not reach our /init:\n{serial}\nvmm:\n{}",
        kernel.display(),
        vm.log()
    );
    assert_eq!(code, 0, "{}", vm.log());
}

/// The bzImage fallback (64-bit boot protocol, zero page) boots a stock Debian kernel to
/// our /init, which powers off.
#[test]
fn vmm_bzimage_fallback_boot() {
    let f = Fixture::get();
    in_kvm(module_path!(), "vmm_bzimage_fallback_boot", f.lab(), || {
        bzimage_boot(&f)
    });
}
