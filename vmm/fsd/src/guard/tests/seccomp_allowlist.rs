//! The seccomp allow-list is complete for the filesystem layer: a child process installs
//! the filter (and no_new_privs), then runs every operation. A missing syscall kills the
//! child with SIGSYS, which fails this test.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD_ENV: &str = "CARAPACE_FSD_SECCOMP_CHILD";

#[test]
fn every_operation_passes_the_seccomp_filter() {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "guard::tests::seccomp_allowlist::child_under_seccomp",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child under seccomp failed: {:?} (signal {:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status,
        out.status.signal()
    );
    assert!(
        stdout.contains("operations passed under seccomp"),
        "{stdout}"
    );
}

#[test]
#[ignore = "run by every_operation_passes_the_seccomp_filter in a child process"]
fn child_under_seccomp() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // The fixture (temp dir, opening the root) is made before, as the daemon does.
    let f = super::fixture();
    nix::sys::prctl::set_no_new_privs().unwrap();
    crate::seccomp::install().unwrap();
    super::exercise_all(&f);
    // Worker threads and their teardown also run under the filter.
    std::thread::spawn(|| std::hint::black_box(1))
        .join()
        .unwrap();
    println!("operations passed under seccomp");
}
