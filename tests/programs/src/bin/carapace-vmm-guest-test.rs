//! carapace-vmm-guest-test: a tiny /init for end-to-end tests of carapace-vmm (not the agent).
//!
//! Built statically on the host (`RUSTFLAGS="-C target-feature=+crt-static" cargo build
//! --release --target x86_64-unknown-linux-gnu -p carapace-test-programs --bin carapace-vmm-guest-test`)
//! and packed as /init of a test initramfs. Behaviour is chosen on the kernel command line
//! with `vmmtest=<item>,<item>...`:
//! - `blk`: read /dev/vda fully, print its length and FNV-1a hash, try a write (read-only test);
//! - `rng`: read 64 bytes from /dev/hwrng;
//! - `echo`: vsock echo server on port 1024 (one thread per stream) and a control server on
//!   port 1025 accepting `poweroff`, `reboot` or `panic` lines;
//! - `fs=<tag>`: mount virtio-fs `<tag>` on /mnt and print /mnt/hello.txt;
//! - `dial=<port>`: connect to the host (CID 2) port, send `hello <port>\n`, print the reply;
//! - `cad`: disable the kernel's Ctrl-Alt-Del restart (`reboot(RB_DISABLE_CAD)`), so the
//!   kernel sends SIGINT to PID 1 instead; on SIGINT print `ctrl-alt-del received` and power
//!   off (SIGINT is blocked in every thread and taken with sigwait);
//! - `cad-ignore`: disable the kernel's Ctrl-Alt-Del restart and never take the SIGINT
//!   (a guest that does not react to the shutdown request);
//! - `cpus`: print /sys/devices/system/cpu/online and the number of CPUs this process may
//!   run on;
//! - `net=<a.b.c.d>/<prefix>`: give eth0 that address, bring it up and serve TCP echo on
//!   port 7777 (one thread per connection);
//! - `mem`: print `mem total_kib=N` (MemTotal) at start and whenever it changes (memory
//!   hot-plug), checked every 200 ms; after it grows, touch as much memory as it grew since
//!   start minus 32 MiB (as a workload would), free it and print `mem touched_mib=M`;
//! - `touch=<MiB>`: touch that much memory (one byte per page), print `touch done mib=N`,
//!   free it (back to the guest kernel: the allocation is its own mapping) and print
//!   `touch freed` (free page reporting tests watch the host side);
//! - `poweroff` / `reboot`: when everything else is done.
//!
//! It prints `vmm-guest-test: ready` first, then writes the boot-done marker (123) to port
//! 0x3f0, and announces power-off (124) / reboot (125) there before reboot(RB_AUTOBOOT).

#[cfg(target_os = "linux")]
mod sys {
    use std::ffi::CString;
    use std::io;

    fn check(r: libc::c_int) -> io::Result<libc::c_int> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    pub fn mount(src: &str, target: &str, fstype: &str) -> io::Result<()> {
        let (s, t, f) = (
            CString::new(src)?,
            CString::new(target)?,
            CString::new(fstype)?,
        );
        let _ = std::fs::create_dir_all(target);
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) })
            .map(drop)
    }

    /// Writes `value` to I/O port `port` (after ioperm).
    pub fn outb(port: u16, value: u8) -> io::Result<()> {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        check(unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) })?;
        // SAFETY: the port was granted above; writing a byte to it has no memory effects.
        unsafe { std::arch::asm!("out dx, al", in("dx") port, in("al") value) };
        Ok(())
    }

    fn sigint_set() -> libc::sigset_t {
        // SAFETY: sigset_t is plain old data; it is initialised by sigemptyset below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        // SAFETY: as above; SIGINT is a valid signal number.
        unsafe { libc::sigaddset(&mut set, libc::SIGINT) };
        set
    }

    /// Blocks SIGINT in this thread (and the threads it starts later).
    pub fn block_sigint() {
        let set = sigint_set();
        // SAFETY: `set` is an initialised sigset_t; the old-mask pointer may be null.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    }

    /// Waits for a (blocked) SIGINT.
    pub fn wait_sigint() -> io::Result<()> {
        let set = sigint_set();
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
        let r = unsafe { libc::sigwait(&set, &mut sig) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    /// reboot(2) with a command that does not restart (e.g. RB_DISABLE_CAD).
    pub fn reboot_cmd(cmd: libc::c_int) -> io::Result<()> {
        // SAFETY: reboot takes no pointers.
        check(unsafe { libc::reboot(cmd) }).map(drop)
    }

    pub fn reboot(cmd: libc::c_int) -> io::Error {
        // SAFETY: sync and reboot take no pointers.
        unsafe { libc::sync() };
        // SAFETY: as above.
        unsafe { libc::reboot(cmd) };
        io::Error::last_os_error()
    }

    fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        a.svm_cid = cid;
        a.svm_port = port;
        a
    }

    fn socket() -> io::Result<std::os::fd::OwnedFd> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let fd = check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) })?;
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
    }

    /// A listening vsock stream socket on `port`.
    pub fn listen(port: u32) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsRawFd;
        let s = socket()?;
        let a = addr(libc::VMADDR_CID_ANY, port);
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `a` is a valid sockaddr_vm of `len` bytes.
        check(unsafe { libc::bind(s.as_raw_fd(), (&raw const a).cast(), len) })?;
        // SAFETY: plain syscall on an owned descriptor.
        check(unsafe { libc::listen(s.as_raw_fd(), 128) })?;
        Ok(s)
    }

    /// Accepts one connection.
    pub fn accept(l: &std::os::fd::OwnedFd) -> io::Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        // SAFETY: null address pointers are allowed by accept(2).
        let fd = check(unsafe {
            libc::accept(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut())
        })?;
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
    }

    /// `struct ifreq` with room for the union (a sockaddr or the flags short).
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: [u8; 24],
    }

    fn ifreq(ifname: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        let n = ifname.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
        r
    }

    fn sockaddr_in(r: &mut IfReq, addr: [u8; 4]) {
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        r.data[4..8].copy_from_slice(&addr);
    }

    /// Sets `ifname`'s IPv4 address and netmask, then brings it up.
    pub fn ifup(ifname: &str, addr: [u8; 4], prefix: u32) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall; the result is checked and owned below.
        let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) })?;
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let s: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        let mask = u32::MAX
            .checked_shl(32 - prefix.min(32))
            .unwrap_or(0)
            .to_be_bytes();
        for (req, value) in [(libc::SIOCSIFADDR, addr), (libc::SIOCSIFNETMASK, mask)] {
            let mut r = ifreq(ifname);
            sockaddr_in(&mut r, value);
            // SAFETY: `r` is a live ifreq-sized buffer the ioctl reads during the call.
            check(unsafe { libc::ioctl(s.as_raw_fd(), req, &raw mut r) })?;
        }
        let mut r = ifreq(ifname);
        let flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: as above.
        check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut r) })?;
        Ok(())
    }

    /// Connects to `cid:port`.
    pub fn connect(cid: u32, port: u32) -> io::Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        let s = socket()?;
        let a = addr(cid, port);
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `a` is a valid sockaddr_vm of `len` bytes.
        check(unsafe { libc::connect(s.as_raw_fd(), (&raw const a).cast(), len) })?;
        Ok(std::fs::File::from(s))
    }
}

#[cfg(target_os = "linux")]
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(target_os = "linux")]
fn say(msg: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "vmm-guest-test: {msg}");
    let _ = o.flush();
}

#[cfg(target_os = "linux")]
fn end(how: &str) -> ! {
    // The guest has no ACPI: RB_POWER_OFF would only halt the CPU. Announce the intent on the
    // marker port, then reset (reboot=k): the VMM tells power-off from reboot by the marker.
    let marker = if how == "reboot" { 125 } else { 124 };
    say(how);
    let _ = sys::outb(0x3f0, marker);
    let e = sys::reboot(libc::RB_AUTOBOOT);
    say(&format!("reboot(2) failed: {e}"));
    std::process::exit(1)
}

#[cfg(target_os = "linux")]
fn echo_server() {
    use std::io::{Read, Write};
    let l = match sys::listen(1024) {
        Ok(l) => l,
        Err(e) => return say(&format!("listen 1024: {e}")),
    };
    std::thread::spawn(move || {
        while let Ok(mut s) = sys::accept(&l) {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let c = match sys::listen(1025) {
        Ok(c) => c,
        Err(e) => return say(&format!("listen 1025: {e}")),
    };
    std::thread::spawn(move || {
        if let Ok(mut s) = sys::accept(&c) {
            let mut line = String::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
                line.push(b[0] as char);
            }
            let _ = s.write_all(b"bye\n");
            match line.trim() {
                "panic" => {
                    // Killing PID 1 panics the kernel; with panic=-1 it resets at once.
                    say("exiting init to panic the kernel");
                    std::process::exit(3);
                }
                other => end(other),
            }
        }
    });
    say("echo server on vsock ports 1024 (echo) and 1025 (control)");
}

#[cfg(target_os = "linux")]
fn mem_total_kib() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(target_os = "linux")]
fn mem_watch() {
    let start = mem_total_kib().unwrap_or(0);
    let mut last = start;
    say(&format!("mem total_kib={last}"));
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let Some(now) = mem_total_kib() else { continue };
        if now == last {
            continue;
        }
        say(&format!("mem total_kib={now}"));
        if now > last {
            let mib = usize::try_from(now.saturating_sub(start) / 1024)
                .unwrap_or(0)
                .saturating_sub(32);
            let mut v = vec![0u8; mib << 20];
            for page in v.chunks_mut(4096) {
                page[0] = 1;
            }
            std::hint::black_box(&v);
            drop(v);
            say(&format!("mem touched_mib={mib}"));
        }
        last = now;
    }
}

#[cfg(target_os = "linux")]
fn net_echo(spec: &str) {
    use std::io::{Read, Write};
    let parsed = spec.split_once('/').and_then(|(a, p)| {
        let ip: std::net::Ipv4Addr = a.parse().ok()?;
        Some((ip.octets(), p.parse::<u32>().ok()?))
    });
    let Some((addr, prefix)) = parsed else {
        return say(&format!("net error: bad address {spec:?}"));
    };
    if let Err(e) = sys::ifup("eth0", addr, prefix) {
        return say(&format!("net error: eth0: {e}"));
    }
    let l = match std::net::TcpListener::bind(("0.0.0.0", 7777)) {
        Ok(l) => l,
        Err(e) => return say(&format!("net error: listen: {e}")),
    };
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    say(&format!("net up {spec}, tcp echo on 7777"));
}

#[cfg(target_os = "linux")]
fn main() {
    use std::io::{Read, Write};
    // Before any thread exists, so every thread inherits the mask (see `cad`).
    sys::block_sigint();
    let _ = sys::mount("devtmpfs", "/dev", "devtmpfs");
    let _ = sys::mount("proc", "/proc", "proc");
    let _ = sys::mount("sysfs", "/sys", "sysfs");
    say("ready");
    if let Err(e) = sys::outb(0x3f0, 123) {
        say(&format!("cannot write the boot-done marker: {e}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let items: Vec<String> = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("vmmtest="))
        .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let mut finish = None;
    for item in &items {
        match item.as_str() {
            "blk" => match std::fs::read("/dev/vda") {
                Ok(d) => {
                    say(&format!("blk len={} fnv={:016x}", d.len(), fnv1a(&d)));
                    let w = std::fs::OpenOptions::new()
                        .write(true)
                        .open("/dev/vda")
                        .and_then(|mut f| f.write_all(&[0u8; 512]).and_then(|()| f.sync_all()));
                    say(&format!(
                        "blk write {}",
                        if w.is_ok() { "ok" } else { "failed" }
                    ));
                }
                Err(e) => say(&format!("blk error {e}")),
            },
            "rng" => {
                let mut b = [0u8; 64];
                match std::fs::File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut b)) {
                    Ok(()) => say(&format!("rng ok nonzero={}", b.iter().any(|&x| x != 0))),
                    Err(e) => say(&format!("rng error {e}")),
                }
            }
            "echo" => echo_server(),
            "cad" => match sys::reboot_cmd(libc::RB_DISABLE_CAD) {
                Ok(()) => {
                    std::thread::spawn(|| match sys::wait_sigint() {
                        Ok(()) => {
                            say("ctrl-alt-del received");
                            end("poweroff");
                        }
                        Err(e) => say(&format!("sigwait: {e}")),
                    });
                    say("cad armed");
                }
                Err(e) => say(&format!("cad error {e}")),
            },
            "cad-ignore" => match sys::reboot_cmd(libc::RB_DISABLE_CAD) {
                Ok(()) => say("cad ignored"),
                Err(e) => say(&format!("cad error {e}")),
            },
            "cpus" => {
                let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
                    .unwrap_or_else(|e| format!("error {e}"));
                let n = std::thread::available_parallelism().map_or(0, |n| n.get());
                say(&format!("cpus online={} usable={n}", online.trim()));
            }
            "mem" => {
                std::thread::spawn(mem_watch);
            }
            // The guest's wall clock twice a second, for the host to compare with its own.
            "clock" => {
                std::thread::spawn(|| {
                    loop {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64());
                        say(&format!("clock {now:.3}"));
                        std::thread::sleep(std::time::Duration::from_millis(500));
                    }
                });
            }
            "poweroff" | "reboot" => finish = Some(item.clone()),
            f if f.starts_with("fs=") => {
                let tag = &f[3..];
                let r = sys::mount(tag, "/mnt", "virtiofs")
                    .and_then(|()| std::fs::read_to_string("/mnt/hello.txt"));
                match r {
                    Ok(text) => say(&format!("fs read {}", text.trim())),
                    Err(e) => say(&format!("fs error {e}")),
                }
            }
            n if n.starts_with("net=") => net_echo(&n[4..]),
            t if t.starts_with("touch=") => match t[6..].parse::<usize>() {
                Ok(mib) => {
                    let mut v = vec![0u8; mib << 20];
                    for page in v.chunks_mut(4096) {
                        page[0] = 1;
                    }
                    std::hint::black_box(&v);
                    say(&format!("touch done mib={mib}"));
                    drop(v);
                    say("touch freed");
                }
                Err(e) => say(&format!("touch error {e}")),
            },
            d if d.starts_with("dial=") => {
                let port: u32 = d[5..].parse().unwrap_or(0);
                let r = sys::connect(2, port).and_then(|mut s| {
                    s.write_all(format!("hello {port}\n").as_bytes())?;
                    let mut reply = String::new();
                    s.read_to_string(&mut reply)?;
                    Ok(reply)
                });
                match r {
                    Ok(reply) => say(&format!("dial reply {}", reply.trim())),
                    Err(e) => say(&format!("dial error {e}")),
                }
            }
            other => say(&format!("unknown item {other}")),
        }
    }
    if let Some(how) = finish {
        end(&how);
    }
    loop {
        std::thread::park();
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {}
