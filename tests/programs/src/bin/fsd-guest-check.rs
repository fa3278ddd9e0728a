//! TEST-ONLY: the `/init` of the guest initramfs that tests/tests/fsd_guest.rs boots.
//!
//! Mounts the virtio-fs tag `shared` on /mnt, runs the conformance checks and the escape
//! attempts from inside the guest, prints one line per check on the console
//! (`CHECK <name> ok|FAIL <why>`, `ESCAPE <name> denied|ESCAPED <how>`), then
//! `FSD-GUEST-CHECK DONE pass=<n> fail=<m> t=<uptime>` and asks the VM to restart (the
//! VMM exits on it). Each check prints `BEGIN <name>` before it runs and its result as it ends, and a
//! heartbeat thread prints `TICK t=<uptime> step=<name>` every 15 s, so the host can tell
//! a slow check, a blocked check and a stopped guest apart. The host-side test
//! asserts on those lines and on the shared and outside directories.
//!
//! With `fsdcheck=bench` on the kernel command line it runs the benchmark instead and
//! prints `BENCH <row> <value> <unit>` lines (the same workload for every daemon).
//!
//! It expects the host to have prepared, in the shared dir: `abs` (symlink to the absolute
//! host path of a directory outside the shared dir holding `secret`), `rel` (relative
//! symlink to it), `pfd` (symlink to /proc/self/fd/3). The secret's content starts with
//! `HOST-SECRET`.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MNT: &str = "/mnt";
const SECRET_MARK: &[u8] = b"HOST-SECRET";

type R = Result<(), String>;

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

fn ensure(cond: bool, why: impl Into<String>) -> R {
    if cond { Ok(()) } else { Err(why.into()) }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in paths")
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn mount(src: &str, target: &str, fstype: &str) -> R {
    let _ = fs::create_dir_all(target);
    let (s, t, f) = (cstr(src), cstr(target), cstr(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings; data is NULL.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("mount {fstype} on {target}: {}", last_err()))
    }
}

/// The check running now (for the heartbeat).
static STEP: Mutex<&str> = Mutex::new("boot");

/// Guest uptime in seconds, as the kernel counts it.
fn uptime() -> String {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A progress line inside a long check (the host's stall detector sees the guest move).
fn progress(what: &str) {
    let step = *STEP.lock().unwrap_or_else(|p| p.into_inner());
    println!("PROGRESS {step} {what} t={}", uptime());
}

/// Prints `TICK` with the current step every `period` from a thread of its own: the host
/// tells a guest that is alive but blocked in one check (ticks go on) from a guest that
/// stopped altogether (ticks stop).
fn start_heartbeat(period: Duration) {
    let _ = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                let step = *STEP.lock().unwrap_or_else(|p| p.into_inner());
                println!("TICK t={} step={step}", uptime());
            }
        });
}

/// Runs `checks` one by one, printing `BEGIN` before and the result line after each (as
/// it happens, so a stall shows which check it is in); returns (passed, failed).
fn run_checks(checks: &[Check], kind: &str, ok: &str, bad: &str) -> (u32, u32) {
    let (mut pass, mut fail) = (0, 0);
    for (name, check) in checks {
        *STEP.lock().unwrap_or_else(|p| p.into_inner()) = name;
        println!("BEGIN {name} t={}", uptime());
        let t = Instant::now();
        let ms = || t.elapsed().as_millis();
        match check() {
            Ok(()) => {
                pass += 1;
                println!("{kind} {name} {ok} ({} ms)", ms());
            }
            Err(why) => {
                fail += 1;
                println!("{kind} {name} {bad} {why} ({} ms)", ms());
            }
        }
    }
    (pass, fail)
}

fn p(rel: &str) -> String {
    format!("{MNT}/{rel}")
}

/// One check: its name and the function running it.
type Check = (&'static str, fn() -> R);

/// The conformance checks, in order (run one at a time, each reported as it ends).
const CONFORMANCE: &[Check] = &[
    ("create-write-read", create_write_read),
    ("rename", rename),
    ("hardlink", hardlink),
    ("symlink", symlinks),
    ("chmod", chmod),
    ("chown", chown),
    ("xattr", xattr),
    ("locks", locks),
    ("sparse-4g", sparse_4g),
    ("readdir-10k", readdir_10k),
    ("mmap-read", mmap_read),
    ("mkfifo", mkfifo),
    ("statfs", statfs),
    ("fallocate-lseek", fallocate_lseek),
    ("unlink-rmdir", unlink_rmdir),
];

fn create_write_read() -> R {
    let path = p("hello.txt");
    fs::write(&path, b"hello from the guest\n").map_err(e("write"))?;
    let mut f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(e("open append"))?;
    f.write_all(b"second line\n").map_err(e("append"))?;
    f.sync_all().map_err(e("fsync"))?;
    drop(f);
    let got = fs::read(&path).map_err(e("read"))?;
    ensure(
        got == b"hello from the guest\nsecond line\n",
        format!("content {got:?}"),
    )
}

fn rename() -> R {
    fs::write(p("r-a"), b"A").map_err(e("write a"))?;
    fs::write(p("r-b"), b"B").map_err(e("write b"))?;
    fs::rename(p("r-a"), p("r-c")).map_err(e("rename"))?;
    ensure(!Path::new(&p("r-a")).exists(), "old name still there")?;
    let (c, b) = (cstr(&p("r-c")), cstr(&p("r-b")));
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    ensure(
        r != 0 && last_err().raw_os_error() == Some(libc::EEXIST),
        "RENAME_NOREPLACE replaced",
    )?;
    // SAFETY: as above.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    ensure(r == 0, format!("RENAME_EXCHANGE: {}", last_err()))?;
    let (rb, rc) = (fs::read(p("r-b")), fs::read(p("r-c")));
    ensure(
        rb.ok().as_deref() == Some(b"A") && rc.ok().as_deref() == Some(b"B"),
        "exchange did not swap",
    )
}

fn hardlink() -> R {
    fs::write(p("h-orig"), b"linked").map_err(e("write"))?;
    fs::hard_link(p("h-orig"), p("h-link")).map_err(e("link"))?;
    let m = fs::metadata(p("h-orig")).map_err(e("stat"))?;
    ensure(m.nlink() == 2, format!("nlink {}", m.nlink()))?;
    let m2 = fs::metadata(p("h-link")).map_err(e("stat link"))?;
    ensure(m.ino() == m2.ino(), "different inodes")
}

fn symlinks() -> R {
    symlink("hello.txt", p("s-rel")).map_err(e("symlink"))?;
    let t = fs::read_link(p("s-rel")).map_err(e("readlink"))?;
    ensure(t == Path::new("hello.txt"), format!("target {t:?}"))?;
    let got = fs::read(p("s-rel")).map_err(e("read through"))?;
    ensure(got.starts_with(b"hello from the guest"), "wrong content")
}

fn chmod() -> R {
    fs::write(p("mode"), b"").map_err(e("write"))?;
    fs::set_permissions(p("mode"), fs::Permissions::from_mode(0o640)).map_err(e("chmod"))?;
    let m = fs::metadata(p("mode")).map_err(e("stat"))?;
    ensure(m.mode() & 0o7777 == 0o640, format!("mode {:o}", m.mode()))
}

fn chown() -> R {
    fs::write(p("owned"), b"").map_err(e("write"))?;
    std::os::unix::fs::chown(p("owned"), Some(1234), Some(2345)).map_err(e("chown"))?;
    let m = fs::metadata(p("owned")).map_err(e("stat"))?;
    ensure(
        m.uid() == 1234 && m.gid() == 2345,
        format!("{}:{}", m.uid(), m.gid()),
    )
}

fn xattr() -> R {
    if fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.contains("fsdcheck.noxattr")) {
        println!("NOTE xattr skipped: the host dir's filesystem has no user xattrs");
        return Ok(());
    }
    let path = cstr(&p("hello.txt"));
    let name = cstr("user.carapace");
    let val = b"guest-value";
    // SAFETY: valid path/name strings; value pointer and length describe `val`.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            0,
        )
    };
    ensure(r == 0, format!("setxattr: {}", last_err()))?;
    let mut buf = [0u8; 64];
    // SAFETY: buffer pointer and length describe `buf`.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    ensure(n >= 0, format!("getxattr: {}", last_err()))?;
    let n = usize::try_from(n).map_err(e("length"))?;
    ensure(&buf[..n] == val, "wrong xattr value")
}

fn ofd_lock(f: &File, typ: i32) -> std::io::Result<()> {
    // SAFETY: flock is a plain C struct; all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // SAFETY: F_OFD_SETLK with a valid flock pointer.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 { Ok(()) } else { Err(last_err()) }
}

fn locks() -> R {
    fs::write(p("lockfile"), b"x").map_err(e("write"))?;
    let a = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("lockfile"))
        .map_err(e("open a"))?;
    let b = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("lockfile"))
        .map_err(e("open b"))?;
    ofd_lock(&a, libc::F_WRLCK).map_err(e("lock a"))?;
    match ofd_lock(&b, libc::F_WRLCK) {
        Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => {}
        other => return Err(format!("second lock: {other:?}")),
    }
    ofd_lock(&a, libc::F_UNLCK).map_err(e("unlock a"))?;
    ofd_lock(&b, libc::F_WRLCK).map_err(e("lock b after unlock"))?;
    // flock(2) too.
    // SAFETY: flock on valid descriptors.
    let r = unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    ensure(r == 0, format!("flock a: {}", last_err()))?;
    // SAFETY: as above.
    let r = unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    ensure(r != 0, "second flock succeeded")
}

fn sparse_4g() -> R {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("sparse"))
        .map_err(e("create"))?;
    let off = 4u64 << 30;
    f.seek(SeekFrom::Start(off)).map_err(e("seek"))?;
    f.write_all(b"Z").map_err(e("write at 4G"))?;
    f.sync_all().map_err(e("fsync"))?;
    let m = f.metadata().map_err(e("stat"))?;
    ensure(m.len() == off + 1, format!("size {}", m.len()))?;
    ensure(
        m.blocks() < 1024,
        format!("not sparse: {} blocks", m.blocks()),
    )?;
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(off)).map_err(e("seek back"))?;
    f.read_exact(&mut byte).map_err(e("read at 4G"))?;
    ensure(byte == *b"Z", "wrong byte at 4G")?;
    f.seek(SeekFrom::Start(1 << 30)).map_err(e("seek hole"))?;
    f.read_exact(&mut byte).map_err(e("read hole"))?;
    ensure(byte == [0], "hole not zero")
}

/// Entries the host puts in `many/` before the guest boots (`f00000`..`f09999`).
const MANY: usize = 10_000;

/// readdir of 10k entries: the host created them (creating 10k files through virtio-fs is
/// the benchmark's job, and under nested emulation it took minutes), the guest lists them
/// all (many READDIR round trips through the daemon's directory stream), checks every
/// name once, then adds one entry the host counts afterwards.
fn readdir_10k() -> R {
    let dir = p("many");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map_err(e("readdir"))?
        .map(|d| d.map(|d| d.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(e("readdir entry"))?;
    names.sort_unstable();
    ensure(names.len() == MANY, format!("{} entries", names.len()))?;
    if let Some((i, bad)) = names
        .iter()
        .enumerate()
        .find(|(i, n)| **n != format!("f{i:05}"))
    {
        return Err(format!("entry {i} is {bad:?}"));
    }
    progress(&format!("{MANY} names listed"));
    fs::metadata(format!("{dir}/f{:05}", MANY - 1)).map_err(e("stat last"))?;
    File::create(format!("{dir}/guest-was-here")).map_err(e("create"))?;
    Ok(())
}

fn mmap_read() -> R {
    let data: Vec<u8> = (0..(256 * 1024u32)).map(|i| (i % 251) as u8).collect();
    fs::write(p("mapped"), &data).map_err(e("write"))?;
    let f = File::open(p("mapped")).map_err(e("open"))?;
    // SAFETY: a fresh private read-only mapping of `data.len()` bytes of an open file.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    ensure(ptr != libc::MAP_FAILED, format!("mmap: {}", last_err()))?;
    // SAFETY: the mapping is `data.len()` readable bytes until munmap below.
    let mapped = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), data.len()) };
    let same = mapped == data.as_slice();
    // SAFETY: unmapping exactly the mapping made above; `mapped` is not used after.
    unsafe { libc::munmap(ptr, data.len()) };
    ensure(same, "mapped bytes differ")
}

fn mkfifo() -> R {
    let path = cstr(&p("fifo"));
    // SAFETY: valid path.
    let r = unsafe { libc::mkfifo(path.as_ptr(), 0o644) };
    ensure(r == 0, format!("mkfifo: {}", last_err()))?;
    let m = fs::symlink_metadata(p("fifo")).map_err(e("stat"))?;
    use std::os::unix::fs::FileTypeExt;
    ensure(m.file_type().is_fifo(), "not a fifo")
}

fn statfs() -> R {
    let path = cstr(MNT);
    // SAFETY: statvfs is a plain C struct; zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    ensure(r == 0, format!("statvfs: {}", last_err()))?;
    ensure(st.f_blocks > 0 && st.f_bsize > 0, "empty statfs")
}

fn fallocate_lseek() -> R {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("falloc"))
        .map_err(e("create"))?;
    // SAFETY: valid descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) };
    ensure(r == 0, format!("fallocate: {}", last_err()))?;
    ensure(
        f.metadata().map_err(e("stat"))?.len() == 1 << 20,
        "size after fallocate",
    )?;
    std::os::unix::fs::FileExt::write_at(&f, b"end", 2 << 20).map_err(e("pwrite"))?;
    let g = File::open(p("falloc")).map_err(e("reopen"))?;
    let mut errs = Vec::new();
    for (what, fd) in [
        ("created fd", f.as_raw_fd()),
        ("reopened fd", g.as_raw_fd()),
    ] {
        for (wname, whence) in [
            ("SEEK_HOLE", libc::SEEK_HOLE),
            ("SEEK_DATA", libc::SEEK_DATA),
        ] {
            // SAFETY: valid descriptor.
            let r = unsafe { libc::lseek(fd, 0, whence) };
            if r < 0 {
                errs.push(format!("{wname} on {what}: {}", last_err()));
            }
        }
    }
    ensure(errs.is_empty(), errs.join("; "))
}

fn unlink_rmdir() -> R {
    fs::create_dir(p("gone")).map_err(e("mkdir"))?;
    fs::write(p("gone/x"), b"").map_err(e("write"))?;
    ensure(fs::remove_dir(p("gone")).is_err(), "rmdir of non-empty dir")?;
    fs::remove_file(p("gone/x")).map_err(e("unlink"))?;
    fs::remove_dir(p("gone")).map_err(e("rmdir"))?;
    ensure(!Path::new(&p("gone")).exists(), "still there")
}

/// Reads `path` and reports an escape if host secret data came back.
fn no_secret(path: &str) -> R {
    match fs::read(path) {
        Ok(d) if d.starts_with(SECRET_MARK) => Err(format!("read host secret via {path}")),
        _ => Ok(()),
    }
}

fn no_create(path: &str) -> R {
    match File::create(path) {
        Ok(_) => {
            // Created *somewhere*; the host test checks it is inside the shared dir.
            println!("NOTE created {path} (host checks where it landed)");
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// The escape attempts, in order.
const ESCAPES: &[Check] = &[
    ("dotdot", dotdot),
    ("abs-symlink", || via_link("abs")),
    ("rel-symlink", || via_link("rel")),
    ("proc-self-fd", proc_self_fd),
    ("guest-made-symlinks", guest_made_links),
    ("mknod-device", mknod_device),
    ("rename-race", rename_race),
];

fn dotdot() -> R {
    // In the guest, /mnt/.. is the guest's own root; whatever it lists is guest data.
    for path in [
        "/mnt/../secret",
        "/mnt/../../secret",
        "/mnt/../../../outside/secret",
    ] {
        no_secret(path)?;
    }
    let up = fs::read_dir("/mnt/..").map_err(e("readdir /mnt/.."))?;
    for ent in up.flatten() {
        ensure(ent.file_name() != "outside", "host parent listed")?;
    }
    Ok(())
}

fn via_link(name: &str) -> R {
    let base = p(name);
    no_secret(&format!("{base}/secret"))?;
    no_create(&format!("{base}/planted-by-guest"))?;
    Ok(())
}

fn proc_self_fd() -> R {
    // The host planted pfd -> /proc/self/fd/3; the guest resolves it in its own /proc.
    no_secret(&p("pfd"))?;
    no_secret(&format!("{}/secret", p("pfd")))?;
    // Hold the mount root open and go through our own fd links.
    let root = File::open(MNT).map_err(e("open /mnt"))?;
    let via = format!("/proc/self/fd/{}/../secret", root.as_raw_fd());
    no_secret(&via)?;
    let via = format!("/proc/self/fd/{}/abs/secret", root.as_raw_fd());
    no_secret(&via)
}

fn guest_made_links() -> R {
    symlink("/", p("g-root")).map_err(e("symlink /"))?;
    symlink("../../../../../../..", p("g-up")).map_err(e("symlink up"))?;
    symlink("/proc/self/root", p("g-proc")).map_err(e("symlink proc"))?;
    for l in ["g-root", "g-up", "g-proc"] {
        for tail in ["outside/secret", "secret"] {
            no_secret(&format!("{}/{tail}", p(l)))?;
        }
    }
    Ok(())
}

fn mknod_device() -> R {
    let path = cstr(&p("blockdev"));
    // SAFETY: valid path; makedev of /dev/vda-like numbers.
    let r = unsafe { libc::mknod(path.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(254, 0)) };
    ensure(r != 0, "block device created in the shared dir")?;
    let path = cstr(&p("chardev"));
    // SAFETY: as above, /dev/mem numbers.
    let r = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 1)) };
    ensure(r != 0, "char device created in the shared dir")
}

fn rename_race() -> R {
    // Swap a real directory and a symlink to the host's outside dir as fast as possible
    // while this thread reads through the name. (Creating files through the name at the
    // same time stalled the guest in a run under TCG; see vmm/fsd/README.md.)
    fs::create_dir(p("race-dir")).map_err(e("mkdir"))?;
    fs::write(p("race-dir/secret"), b"inside").map_err(e("write"))?;
    let abs = fs::read_link(p("abs")).map_err(e("readlink abs"))?;
    symlink(&abs, p("race-link")).map_err(e("symlink"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let swapper = std::thread::spawn(move || {
        let (a, b) = (cstr(&p("race-dir")), cstr(&p("race-link")));
        let mut n = 0u32;
        while !s2.load(Ordering::Relaxed) && n < 5_000 {
            // SAFETY: valid paths.
            unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            n += 1;
        }
        n
    });
    let mut result = Ok(());
    for _ in 0..500 {
        for name in ["race-dir", "race-link"] {
            if let Err(err) = no_secret(&format!("{}/secret", p(name))) {
                result = Err(err);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().map_err(|_| "swapper panicked".to_string())?;
    println!("NOTE rename-race swaps={swaps}");
    result
}

/// Defaults of the benchmark sizes; `fsdcheck.mib=N`, `fsdcheck.ops=N` and
/// `fsdcheck.files=N` on the kernel command line override them (quick runs).
const BENCH_FILE_MIB: usize = 64;
const BENCH_RANDOM_OPS: u32 = 2048;
const BENCH_FILES: u32 = 10_000;

/// `fsdcheck.<key>=<n>` from the kernel command line, or `default`.
fn cmdline_param(key: &str, default: u32) -> u32 {
    let prefix = format!("fsdcheck.{key}=");
    fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|c| {
            c.split_whitespace()
                .find_map(|w| w.strip_prefix(&prefix)?.parse().ok())
        })
        .unwrap_or(default)
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", b"3");
}

fn report(row: &str, amount: f64, unit: &str, start: std::time::Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!("BENCH {row} {:.1} {unit}", amount / secs);
}

/// A small deterministic generator for random offsets (same sequence for every daemon).
fn next_rand(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *state >> 33
}

fn bench() -> R {
    use std::os::unix::fs::FileExt;
    use std::time::Instant;
    let file_mib = cmdline_param("mib", BENCH_FILE_MIB as u32) as usize;
    let random_ops = cmdline_param("ops", BENCH_RANDOM_OPS);
    let files = cmdline_param("files", BENCH_FILES);
    println!("BENCH sizes {file_mib} MiB, {random_ops} random ops, {files} files");
    let path = p("bench.dat");
    let chunk = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    let mut f = File::create(&path).map_err(e("create"))?;
    for _ in 0..file_mib {
        f.write_all(&chunk).map_err(e("write"))?;
    }
    f.sync_all().map_err(e("fsync"))?;
    drop(f);
    report("seq-write", file_mib as f64, "MiB/s", t);

    drop_caches();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = File::open(&path).map_err(e("open"))?;
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).map_err(e("read"))?;
        if n == 0 {
            break;
        }
        total += n;
    }
    ensure(total == file_mib << 20, format!("read {total} bytes"))?;
    report("seq-read", file_mib as f64, "MiB/s", t);

    let blocks = (file_mib << 20) as u64 / 4096;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(e("open rw"))?;
    let page = [0x5au8; 4096];
    let mut rng = 42u64;
    let t = Instant::now();
    for _ in 0..random_ops {
        let off = (next_rand(&mut rng) % blocks) * 4096;
        f.write_all_at(&page, off).map_err(e("pwrite"))?;
    }
    f.sync_all().map_err(e("fsync"))?;
    report("rand-write-4k", f64::from(random_ops), "IOPS", t);

    drop_caches();
    let mut page = [0u8; 4096];
    let t = Instant::now();
    for _ in 0..random_ops {
        let off = (next_rand(&mut rng) % blocks) * 4096;
        f.read_exact_at(&mut page, off).map_err(e("pread"))?;
    }
    report("rand-read-4k", f64::from(random_ops), "IOPS", t);
    drop(f);

    let dir = p("bench-files");
    fs::create_dir(&dir).map_err(e("mkdir"))?;
    let t = Instant::now();
    for i in 0..files {
        File::create(format!("{dir}/{i}")).map_err(e("create"))?;
    }
    report("create-10k", f64::from(files), "ops/s", t);
    drop_caches();
    let t = Instant::now();
    for i in 0..files {
        fs::metadata(format!("{dir}/{i}")).map_err(e("stat"))?;
    }
    report("stat-10k", f64::from(files), "ops/s", t);
    let t = Instant::now();
    for i in 0..files {
        fs::remove_file(format!("{dir}/{i}")).map_err(e("unlink"))?;
    }
    report("unlink-10k", f64::from(files), "ops/s", t);
    Ok(())
}

fn is_bench() -> bool {
    fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "fsdcheck=bench"))
}

fn main() {
    let _ = mount("proc", "/proc", "proc");
    let _ = mount("devtmpfs", "/dev", "devtmpfs");
    let mut pass = 0;
    let mut fail = 0;
    match mount("shared", MNT, "virtiofs") {
        Ok(()) if is_bench() => match bench() {
            Ok(()) => pass += 1,
            Err(why) => {
                fail += 1;
                println!("BENCH FAIL {why}");
            }
        },
        Ok(()) => {
            println!("CHECK mount ok");
            pass += 1;
            start_heartbeat(Duration::from_secs(15));
            for (checks, kind, ok, bad) in [
                (CONFORMANCE, "CHECK", "ok", "FAIL"),
                (ESCAPES, "ESCAPE", "denied", "ESCAPED"),
            ] {
                let (p, f) = run_checks(checks, kind, ok, bad);
                pass += p;
                fail += f;
            }
            *STEP.lock().unwrap_or_else(|p| p.into_inner()) = "done";
        }
        Err(why) => {
            fail += 1;
            println!("CHECK mount FAIL {why}");
        }
    }
    println!(
        "FSD-GUEST-CHECK DONE pass={pass} fail={fail} t={}",
        uptime()
    );
    let _ = std::io::stdout().flush();
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // A restart request ends the VM: the VMM exits on a guest reset (carapace-vmm with
    // code 32, QEMU with `-no-reboot`); microvm without ACPI has no power-off device.
    // Nothing runs after this.
    // SAFETY: reboot has no memory-safety preconditions.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
}
