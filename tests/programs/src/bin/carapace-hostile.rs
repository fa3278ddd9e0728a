//! TEST-ONLY: a hostile container workload for tests/tests/hostile_kvm.rs.
//!
//! Runs inside a container of a Carapace pod (a real VM, started through containerd's CRI)
//! and attacks what a container can reach: the guest agent over vsock and by signal, the
//! VMM's vsock muxer, the console and port I/O paths, and the host through volumes. Usage:
//!
//! ```text
//! carapace-hostile ATTACK [key=value...] [+ ATTACK [key=value...]]...
//! ```
//!
//! Attacks run one after another; each prints one verdict line,
//! `HOSTILE <attack> ok|BREACH|unavailable <key=value details>`, then the program prints
//! `HOSTILE done breaches=<n>` and exits (status 0 either way: the host decides).
//!
//! | attack | options | what |
//! |---|---|---|
//! | `agent` | | vsock connects to CID 1, the guest's own CID and the host (CID 2) on ports 1..=1024; `/proc` and PID 1 must not be the agent's; SIGKILL/SIGSTOP to PID 1 |
//! | `vsock-flood` | `secs` | non-blocking connects to CID 2 on unused ports, as many as possible |
//! | `console-flood` | `secs`, `mib` | `/dev/console`, `/dev/ttyS0`, `/dev/kmsg`, and the UART's port directly (`ioperm`) |
//! | `pio-flood` | `secs` | `out`/`in` on an unclaimed port (COM2) in a tight loop |
//! | `mmio-flood` | | needs `/dev/mem`; says `unavailable` when the guest kernel has none |
//! | `setuid` | `dir` | setuid/setgid modes, chown to root, writes to a setuid file, `security.capability`, a device node, in a volume |
//! | `ro-volume` | `dir` | writes into a read-only volume and its submount, also after a remount read-write |
//! | `starve` | `secs` | SCHED_FIFO 99 busy loop with real-time throttling off: the guest's agent gets no CPU |

use std::collections::{BTreeMap, VecDeque};
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// The agent's vsock port (carapace_protocol::AGENT_VSOCK_PORT).
const AGENT_PORT: u32 = 1023;
const HOST_CID: u32 = 2;
const LOCAL_CID: u32 = 1;
/// `_IO(7, 0xb9)`: the guest's own CID, asked of `/dev/vsock`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
/// COM1, the guest console's UART.
const COM1: u16 = 0x3f8;
/// COM2: no device claims it in carapace-vmm.
const COM2: u16 = 0x2f8;

/// One attack's verdict.
struct Verdict {
    breaches: Vec<String>,
    facts: Vec<(String, String)>,
    unavailable: Option<String>,
}

impl Verdict {
    fn new() -> Self {
        Verdict {
            breaches: Vec::new(),
            facts: Vec::new(),
            unavailable: None,
        }
    }
    fn fact(&mut self, k: &str, v: impl ToString) {
        self.facts.push((k.to_owned(), v.to_string()));
    }
    fn breach(&mut self, what: impl Into<String>) {
        self.breaches.push(what.into());
    }
    fn print(&self, attack: &str) {
        let status = if !self.breaches.is_empty() {
            "BREACH"
        } else if self.unavailable.is_some() {
            "unavailable"
        } else {
            "ok"
        };
        let mut line = format!("HOSTILE {attack} {status}");
        if let Some(why) = &self.unavailable {
            line.push_str(&format!(" why={}", why.replace(' ', "_")));
        }
        for (k, v) in &self.facts {
            line.push_str(&format!(" {k}={}", v.replace(' ', "_")));
        }
        for b in &self.breaches {
            line.push_str(&format!(" breach={}", b.replace(' ', "_")));
        }
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> String {
    match e {
        0 => "ok".into(),
        libc::ENODEV => "ENODEV".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::EINPROGRESS => "EINPROGRESS".into(),
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EROFS => "EROFS".into(),
        libc::ENOTSUP => "ENOTSUP".into(),
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".into(),
        libc::ENOBUFS => "ENOBUFS".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EMFILE => "EMFILE".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ENXIO => "ENXIO".into(),
        libc::EXDEV => "EXDEV".into(),
        libc::EINVAL => "EINVAL".into(),
        e => format!("errno{e}"),
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in paths")
}

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// A non-blocking AF_VSOCK stream socket and the result of `connect` (0 or the errno).
fn vsock_connect_nb(cid: u32, port: u32) -> Result<(OwnedFd, i32), i32> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let a = sockaddr_vm(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm and its size is passed.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const a).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    Ok((fd, if r == 0 { 0 } else { errno() }))
}

/// Waits until the non-blocking connect on `fd` settles; its result (0: connected).
fn connect_result(fd: &OwnedFd, timeout: Duration) -> i32 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&raw mut p, 1, ms) };
    if n == 0 {
        return libc::ETIMEDOUT;
    }
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len are valid for getsockopt's SO_ERROR (an int).
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &raw mut len,
        )
    };
    if r != 0 { errno() } else { err }
}

/// A ttrpc request frame (10-byte header, then a protobuf `Request` naming the agent's
/// service and its `Version` method with an empty payload).
fn ttrpc_request() -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, s) in [(0x0a, "carapace.agent.v1.Agent"), (0x12, "Version")] {
        body.push(tag);
        body.push(s.len() as u8);
        body.extend_from_slice(s.as_bytes());
    }
    let mut frame = Vec::new();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes()); // stream id (odd: client)
    frame.push(1); // type: request
    frame.push(0); // flags
    frame.extend_from_slice(&body);
    frame
}

/// Whether the peer on `fd` answers a ttrpc request with a ttrpc response header.
fn answers_ttrpc(fd: OwnedFd) -> bool {
    let mut f = fs::File::from(fd);
    // SAFETY: fcntl on our own descriptor: back to blocking mode.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            f.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if f.write_all(&ttrpc_request()).is_err() {
        return false;
    }
    let mut hdr = [0u8; 10];
    f.read_exact(&mut hdr).is_ok() && hdr[8] == 2
}

/// Connects to `cid` on every port of `ports`, 64 at a time; returns the result per port
/// and, for those that connected, whether ttrpc answered.
fn probe(cid: u32, ports: &[u32]) -> (BTreeMap<String, usize>, Vec<(u32, bool)>) {
    let mut outcomes = BTreeMap::new();
    let mut connected = Vec::new();
    for batch in ports.chunks(64) {
        let mut pending = Vec::new();
        for &port in batch {
            match vsock_connect_nb(cid, port) {
                Err(e) => {
                    *outcomes
                        .entry(format!("socket-{}", errno_name(e)))
                        .or_default() += 1
                }
                Ok((fd, 0)) => pending.push((port, fd, 0)),
                Ok((fd, libc::EINPROGRESS)) => pending.push((port, fd, libc::EINPROGRESS)),
                Ok((_, e)) => *outcomes.entry(errno_name(e)).or_default() += 1,
            }
        }
        for (port, fd, first) in pending {
            let r = if first == 0 {
                0
            } else {
                connect_result(&fd, Duration::from_secs(10))
            };
            *outcomes.entry(errno_name(r)).or_default() += 1;
            if r == 0 {
                connected.push((port, answers_ttrpc(fd)));
            }
        }
    }
    (outcomes, connected)
}

fn summary(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The guest's own CID from `/dev/vsock`, or `None` (unprivileged containers lack it).
fn local_cid() -> Option<u32> {
    let f = fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 to the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &raw mut cid) };
    (r == 0).then_some(cid)
}

fn proc_text(pid: &str, file: &str) -> String {
    fs::read(format!("/proc/{pid}/{file}"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The process state letter of `/proc/<pid>/stat` (after the parenthesised comm).
fn proc_state(pid: &str) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?.1.chars().next()
}

static GOT_SIGINT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    GOT_SIGINT.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn attack_agent() -> Verdict {
    let mut v = Verdict::new();
    let ports: Vec<u32> = (1..=1024).collect();

    // CID 1 (loopback) and the guest's own CID: no transport may carry these at all.
    let own = local_cid();
    v.fact(
        "own_cid",
        own.map_or_else(|| "unknown(assumed 3)".into(), |c| c.to_string()),
    );
    for (name, cid) in [("cid1", LOCAL_CID), ("own", own.unwrap_or(3))] {
        let (outcomes, connected) = probe(cid, &ports);
        v.fact(name, summary(&outcomes));
        for (port, ttrpc) in connected {
            v.breach(format!(
                "{name}:{port}-connected{}",
                if ttrpc { "-ttrpc-answered" } else { "" }
            ));
        }
    }
    // The host (CID 2): the VMM's muxer forwards to host sockets named after the port;
    // a connection is a host service, a ttrpc answer would be the agent (or a shim).
    let (outcomes, connected) = probe(HOST_CID, &ports);
    v.fact("cid2", summary(&outcomes));
    let mut open = Vec::new();
    for (port, ttrpc) in connected {
        if ttrpc {
            v.breach(format!("cid2:{port}-ttrpc-answered"));
        }
        open.push(port.to_string());
    }
    v.fact(
        "cid2_open",
        if open.is_empty() {
            "none".into()
        } else {
            open.join(",")
        },
    );
    // Taking over the agent's port: bind it ourselves (the agent holds it; a second bind
    // must fail, and without CAP_NET_BIND_SERVICE any port <= 1023 must).
    // SAFETY: plain socket(2); checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let a = sockaddr_vm(libc::VMADDR_CID_ANY, AGENT_PORT);
        // SAFETY: valid sockaddr_vm and its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const a).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r == 0 {
            v.breach("bound-the-agent-port");
        } else {
            v.fact("bind_agent_port", errno_name(errno()));
        }
    }

    // The agent is the guest's PID 1 in the root pid namespace, beside the kernel threads.
    let me = std::process::id().to_string();
    let mut visible = 0;
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        visible += 1;
        let comm = proc_text(&pid, "comm");
        let cmdline = proc_text(&pid, "cmdline");
        if comm == "kthreadd" || cmdline.contains("carapace-agent") || cmdline == "/init" {
            v.breach(format!("sees-pid{pid}:{comm}"));
        }
    }
    v.fact("visible_pids", visible);
    let pid1 = proc_text("1", "cmdline");
    v.fact("pid1", if pid1.is_empty() { "?".into() } else { pid1 });
    if me == "1" {
        // Our own pid namespace: PID 1 is this program, so a signal to PID 1 must land here.
        // SAFETY: an async-signal-safe handler (one atomic store) for SIGINT.
        unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
        // SAFETY: kill(2) with constant arguments.
        let r = unsafe { libc::kill(1, libc::SIGINT) };
        std::thread::sleep(Duration::from_millis(200));
        let hit = GOT_SIGINT.load(std::sync::atomic::Ordering::SeqCst);
        v.fact(
            "kill1_sigint",
            if r != 0 {
                errno_name(errno())
            } else if hit {
                "hit-self".into()
            } else {
                "not-delivered".into()
            },
        );
        if r == 0 && !hit {
            v.breach("sigint-to-pid1-went-elsewhere");
        }
    } else {
        // The kernel ignores SIGKILL and SIGSTOP sent to a namespace's init from inside it;
        // if PID 1 were the agent, SIGINT (its power-off signal) is the one that would hurt,
        // and the /proc checks above already call that a breach.
        // SAFETY: kill(2) with constant arguments.
        let r = unsafe { libc::kill(1, libc::SIGKILL) };
        v.fact(
            "kill1_sigkill",
            errno_name(if r == 0 { 0 } else { errno() }),
        );
        // SAFETY: as above.
        let r = unsafe { libc::kill(1, libc::SIGSTOP) };
        v.fact(
            "kill1_sigstop",
            errno_name(if r == 0 { 0 } else { errno() }),
        );
        std::thread::sleep(Duration::from_millis(500));
        match proc_state("1") {
            None => v.breach("pid1-gone-after-sigkill"),
            Some('T') => {
                v.breach("pid1-stopped");
                // SAFETY: as above.
                unsafe { libc::kill(1, libc::SIGCONT) };
            }
            Some(s) => v.fact("pid1_state", s),
        }
    }
    v
}

fn opt<'a>(opts: &'a BTreeMap<String, String>, k: &str, default: &'a str) -> &'a str {
    opts.get(k).map_or(default, String::as_str)
}

fn secs(opts: &BTreeMap<String, String>, default: u64) -> Duration {
    Duration::from_secs(opt(opts, "secs", "").parse().unwrap_or(default))
}

fn attack_vsock_flood(opts: &BTreeMap<String, String>) -> Verdict {
    let mut v = Verdict::new();
    let dur = secs(opts, 20);
    let start = Instant::now();
    let mut open: VecDeque<OwnedFd> = VecDeque::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut attempts: u64 = 0;
    let mut burst = Instant::now();
    while start.elapsed() < dur {
        pause_between_bursts(&mut burst);
        for _ in 0..64 {
            // unused ports, spread so no two live sockets share one
            let port = 40_000 + (attempts % 20_000) as u32;
            attempts += 1;
            match vsock_connect_nb(HOST_CID, port) {
                Ok((fd, e)) => {
                    *outcomes.entry(errno_name(e)).or_default() += 1;
                    open.push_back(fd);
                }
                Err(e) => {
                    *outcomes
                        .entry(format!("socket-{}", errno_name(e)))
                        .or_default() += 1
                }
            }
            while open.len() > 512 {
                open.pop_front();
            }
        }
    }
    drop(open);
    v.fact("attempts", attempts);
    v.fact("secs", format!("{:.1}", start.elapsed().as_secs_f64()));
    v.fact("results", summary(&outcomes));
    v
}

/// Floods run in bursts: 200 ms flat out, then 100 ms asleep. A guest vCPU pinned at
/// 100 % for a long time is what makes the lab's emulated SVM lose interrupts
/// (tests/README.md "The lab"); at two thirds it still outruns everything the VMM does per
/// event by far.
fn pause_between_bursts(burst: &mut Instant) {
    if burst.elapsed() >= Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(100));
        *burst = Instant::now();
    }
}

/// Starves the guest: SCHED_FIFO at the highest priority, real-time throttling off, a busy
/// loop for `secs` (default: until killed). On the pod's one vCPU nothing else runs, the
/// agent included: the host must still be able to stop and remove the pod.
fn attack_starve(opts: &BTreeMap<String, String>) -> Verdict {
    let mut v = Verdict::new();
    let dur = secs(opts, 3600);
    let rt = fs::write("/proc/sys/kernel/sched_rt_runtime_us", b"-1");
    v.fact(
        "rt_throttling_off",
        rt.map_or_else(
            |e| errno_name(e.raw_os_error().unwrap_or(0)),
            |()| "ok".into(),
        ),
    );
    let p = libc::sched_param { sched_priority: 99 };
    // SAFETY: a valid sched_param for this process.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const p) };
    v.fact("fifo99", errno_name(if r == 0 { 0 } else { errno() }));
    // the verdict first, and time for the agent's stdio relay to take it: nothing gets
    // out once the loop runs
    v.print("starve");
    std::thread::sleep(Duration::from_secs(3));
    let start = Instant::now();
    while start.elapsed() < dur {
        std::hint::spin_loop();
    }
    Verdict::new()
}

/// Grants this process access to `len` ports from `port` (needs CAP_SYS_RAWIO).
fn ioperm(port: u16, len: u16) -> Result<(), i32> {
    // SAFETY: ioperm(2) changes only this thread's I/O permission bitmap.
    let r = unsafe { libc::ioperm(port.into(), len.into(), 1) };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

fn outb(port: u16, val: u8) {
    // SAFETY: the caller holds ioperm for `port`; an `out` to it exits to the VMM.
    unsafe { std::arch::asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack)) };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller holds ioperm for `port`; an `in` from it exits to the VMM.
    unsafe { std::arch::asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack)) };
    v
}

fn attack_console_flood(opts: &BTreeMap<String, String>) -> Verdict {
    let mut v = Verdict::new();
    let dur = secs(opts, 20);
    let budget: u64 = opt(opts, "mib", "64").parse::<u64>().unwrap_or(64) << 20;
    let line = format!("HOSTILE-FLOOD {}\n", "x".repeat(48));
    let deadline = Instant::now() + dur;
    let mut threads = Vec::new();
    // One writer per path, in parallel: each gets the whole time and a share of the budget.
    for path in ["/dev/console", "/dev/ttyS0", "/dev/kmsg"] {
        let line = line.clone();
        threads.push(std::thread::spawn(move || {
            let kmsg = path == "/dev/kmsg";
            let mut written: u64 = 0;
            let mut first_err = None;
            let mut f = match fs::OpenOptions::new().write(true).open(path) {
                Ok(f) => Some(f),
                Err(e) => return (path, 0, Some(errno_name(e.raw_os_error().unwrap_or(0)))),
            };
            while Instant::now() < deadline && written < budget / 4 {
                // /dev/kmsg rate-limits per open file: a fresh open for each record, and
                // the highest level so the console prints it whatever the log level.
                if kmsg {
                    f = fs::OpenOptions::new().write(true).open(path).ok();
                }
                let Some(w) = f.as_mut() else { break };
                let rec = if kmsg {
                    format!("<0>{line}")
                } else {
                    line.clone()
                };
                match w.write(rec.as_bytes()) {
                    Ok(n) => written += n as u64,
                    Err(e) => {
                        first_err.get_or_insert(errno_name(e.raw_os_error().unwrap_or(0)));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            (path, written, first_err)
        }));
    }
    // The UART itself, bypassing the guest kernel's tty layer: a byte per `out`.
    let pio = std::thread::spawn(move || -> Result<u64, i32> {
        ioperm(COM1, 8)?;
        let mut n: u64 = 0;
        let bytes = b"HOSTILE-UART-FLOOD 0123456789abcdefghijklmnopqrstuvwxyz\n";
        let mut burst = Instant::now();
        while Instant::now() < deadline && n < budget / 4 {
            pause_between_bursts(&mut burst);
            for &b in bytes {
                outb(COM1, b);
            }
            n += bytes.len() as u64;
        }
        Ok(n)
    });
    let mut total = 0;
    for t in threads {
        let (path, n, err) = t.join().expect("writer thread");
        total += n;
        let name = path.trim_start_matches("/dev/");
        v.fact(name, n);
        if let Some(e) = err {
            v.fact(&format!("{name}_err"), e);
        }
    }
    match pio.join().expect("uart thread") {
        Ok(n) => {
            total += n;
            v.fact("uart", n);
        }
        Err(e) => v.fact("uart_err", errno_name(e)),
    }
    v.fact("total", total);
    v
}

fn attack_pio_flood(opts: &BTreeMap<String, String>) -> Verdict {
    let mut v = Verdict::new();
    let dur = secs(opts, 10);
    if let Err(e) = ioperm(COM2, 8) {
        v.unavailable = Some(format!("ioperm {}", errno_name(e)));
        return v;
    }
    let start = Instant::now();
    let mut ops: u64 = 0;
    let mut ones: u64 = 0;
    let mut burst = Instant::now();
    while start.elapsed() < dur {
        pause_between_bursts(&mut burst);
        for i in 0..256u16 {
            outb(COM2 + (i % 8), i as u8);
            if inb(COM2 + (i % 8)) == 0xff {
                ones += 1;
            }
        }
        ops += 512;
    }
    v.fact("ops", ops);
    v.fact("reads_0xff", ones);
    v.fact("secs", format!("{:.1}", start.elapsed().as_secs_f64()));
    v
}

fn attack_mmio_flood() -> Verdict {
    let mut v = Verdict::new();
    // /dev/mem, or a node made for it (a privileged container may mknod): without
    // CONFIG_DEVMEM the open fails with ENXIO/ENODEV, and no other path maps MMIO.
    let node = "/tmp/hostile-mem";
    let _ = fs::remove_file(node);
    // SAFETY: mknod(2) with a valid path; makedev(1, 1) is /dev/mem.
    let made = unsafe {
        libc::mknod(
            cstr(node).as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(1, 1),
        )
    };
    let mknod_err = if made == 0 { 0 } else { errno() };
    let mut opened = Vec::new();
    for p in ["/dev/mem", node] {
        match fs::OpenOptions::new().read(true).write(true).open(p) {
            Ok(_) => opened.push(p),
            Err(e) => v.fact(
                p.trim_start_matches('/'),
                errno_name(e.raw_os_error().unwrap_or(0)),
            ),
        }
    }
    let _ = fs::remove_file(node);
    v.fact("mknod", errno_name(mknod_err));
    if opened.is_empty() {
        v.unavailable = Some("no /dev/mem in the guest kernel (CONFIG_DEVMEM off)".into());
    } else {
        // Not written: a guest kernel with /dev/mem needs the register flood added here.
        v.breach(format!(
            "devmem-opened:{}-flood-not-implemented",
            opened.join(",")
        ));
    }
    v
}

/// The file's mode and whether it carries `security.capability`.
fn mode_and_caps(p: &Path) -> (u32, bool) {
    let mode = fs::metadata(p).map(|m| m.mode()).unwrap_or(0);
    let mut buf = [0u8; 64];
    let c = cstr(&p.to_string_lossy());
    // SAFETY: valid path and name, buffer and its length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            cstr("security.capability").as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (mode, n >= 0)
}

fn chown(p: &Path, uid: u32, gid: u32) -> i32 {
    let c = cstr(&p.to_string_lossy());
    // SAFETY: valid path.
    let r = unsafe { libc::chown(c.as_ptr(), uid, gid) };
    if r == 0 { 0 } else { errno() }
}

fn attack_setuid(opts: &BTreeMap<String, String>) -> Verdict {
    let mut v = Verdict::new();
    let dir = Path::new(opt(opts, "dir", "/vol"));
    let setid = libc::S_ISUID | libc::S_ISGID;
    // (name, chown to root first, mode)
    for (name, root, mode) in [
        ("suid", false, 0o4755),
        ("sgid", false, 0o2755),
        ("rootsuid", true, 0o6755),
    ] {
        let p = dir.join(name);
        if let Err(e) = fs::write(&p, b"#!/bin/sh\nid\n") {
            v.fact(name, format!("write-{e}"));
            continue;
        }
        let chowned = if root { chown(&p, 0, 0) } else { 0 };
        // chown before chmod: a chown clears the bits on Linux, so the chmod is last and
        // only the fs daemon stands between the mode and the host
        let chmod = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
        let (m, _) = mode_and_caps(&p);
        v.fact(
            name,
            format!(
                "chown:{},chmod:{},mode:{:o}",
                errno_name(chowned),
                chmod.map_or_else(
                    |e| errno_name(e.raw_os_error().unwrap_or(0)),
                    |()| "ok".into()
                ),
                m & 0o7777
            ),
        );
        if m & setid != 0 {
            v.breach(format!("{name}-mode-{:o}", m & 0o7777));
        }
    }
    // A setuid file the host made: a guest write must clear the bit.
    let host = dir.join("hostsuid");
    let before = mode_and_caps(&host).0;
    let wrote = fs::OpenOptions::new()
        .append(true)
        .open(&host)
        .and_then(|mut f| f.write_all(b"# guest was here\n"));
    let after = mode_and_caps(&host).0;
    v.fact(
        "hostsuid",
        format!(
            "before:{:o},write:{},after:{:o}",
            before & 0o7777,
            wrote.map_or_else(
                |e| errno_name(e.raw_os_error().unwrap_or(0)),
                |()| "ok".into()
            ),
            after & 0o7777
        ),
    );
    if after & setid != 0 {
        v.breach(format!("hostsuid-still-{:o}-after-write", after & 0o7777));
    }
    // File capabilities: a v2 vfs_cap_data granting everything.
    let capfile = dir.join("capfile");
    let _ = fs::write(&capfile, b"x");
    let mut cap = Vec::new();
    cap.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes()); // VFS_CAP_REVISION_2 | effective
    for _ in 0..2 {
        cap.extend_from_slice(&u32::MAX.to_le_bytes()); // permitted
        cap.extend_from_slice(&0u32.to_le_bytes()); // inheritable
    }
    let c = cstr(&capfile.to_string_lossy());
    // SAFETY: valid path, name and value buffer with its length.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            cstr("security.capability").as_ptr(),
            cap.as_ptr().cast(),
            cap.len(),
            0,
        )
    };
    v.fact("setcap", errno_name(if r == 0 { 0 } else { errno() }));
    if mode_and_caps(&capfile).1 {
        v.breach("security.capability-set");
    }
    // A device node: /dev/mem's numbers, world-writable.
    let dev = dir.join("devmem");
    let c = cstr(&dev.to_string_lossy());
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 1)) };
    v.fact("mknod", errno_name(if r == 0 { 0 } else { errno() }));
    if fs::symlink_metadata(&dev).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_char_device()
    }) {
        v.breach("device-node-made");
    }
    v
}

fn try_create(p: &Path) -> i32 {
    match fs::write(p, b"guest was here") {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn remount_rw(p: &Path) -> i32 {
    let c = cstr(&p.to_string_lossy());
    // SAFETY: valid path; NULL source, type and data are allowed for a remount.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r == 0 { 0 } else { errno() }
}

fn attack_ro_volume(opts: &BTreeMap<String, String>) -> Verdict {
    let mut v = Verdict::new();
    let dir = Path::new(opt(opts, "dir", "/ro"));
    let sub = dir.join(opt(opts, "sub", "sub"));
    v.fact(
        "sub_listing",
        fs::read_dir(&sub).map_or_else(
            |e| errno_name(e.raw_os_error().unwrap_or(0)),
            |d| d.count().to_string(),
        ),
    );
    let check = |v: &mut Verdict, round: &str| {
        for (name, p) in [
            ("top", dir.join("evil")),
            ("sub", sub.join("evil")),
            ("existing", sub.join("keep")),
        ] {
            let e = if name == "existing" {
                match fs::OpenOptions::new().append(true).open(&p) {
                    Ok(mut f) => match f.write_all(b"guest") {
                        Ok(()) => 0,
                        Err(e) => e.raw_os_error().unwrap_or(-1),
                    },
                    Err(e) => e.raw_os_error().unwrap_or(-1),
                }
            } else {
                try_create(&p)
            };
            v.fact(&format!("{round}_{name}"), errno_name(e));
            if e == 0 {
                v.breach(format!("{round}-{name}-written"));
            }
        }
    };
    check(&mut v, "ro");
    // Guest root can make its own view writable; the host's bind must still refuse.
    let r1 = remount_rw(dir);
    let r2 = remount_rw(&sub);
    v.fact("remount", format!("{}/{}", errno_name(r1), errno_name(r2)));
    if r1 == 0 || r2 == 0 {
        check(&mut v, "rw");
    }
    v
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut breaches = 0;
    for group in args.split(|a| a == "+") {
        let Some((attack, rest)) = group.split_first() else {
            continue;
        };
        let opts: BTreeMap<String, String> = rest
            .iter()
            .filter_map(|a| a.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        println!("HOSTILE begin {attack}");
        let _ = std::io::stdout().flush();
        let v = match attack.as_str() {
            "agent" => attack_agent(),
            "vsock-flood" => attack_vsock_flood(&opts),
            "console-flood" => attack_console_flood(&opts),
            "pio-flood" => attack_pio_flood(&opts),
            "mmio-flood" => attack_mmio_flood(),
            "setuid" => attack_setuid(&opts),
            "ro-volume" => attack_ro_volume(&opts),
            "starve" => {
                // prints its own verdict before it starts
                attack_starve(&opts);
                continue;
            }
            other => {
                let mut v = Verdict::new();
                v.unavailable = Some(format!("unknown attack {other}"));
                v
            }
        };
        breaches += v.breaches.len();
        v.print(attack);
    }
    println!("HOSTILE done breaches={breaches}");
    let _ = std::io::stdout().flush();
}
