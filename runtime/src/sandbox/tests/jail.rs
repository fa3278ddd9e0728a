//! The VMM's jail through the sandbox lifecycle: the uid claimed, described and given back.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn vm_json(f: &Fixture, id: &str) -> serde_json::Value {
    let path = f.rt.paths(id).unwrap().vm_json;
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn each_sandbox_gets_its_own_jail_and_uid_and_delete_gives_them_back() {
    let f = fixture(Setup::default());
    let mut uids = Vec::new();
    for id in ["c1", "c2"] {
        let st = f.rt.create(id, &f.bundle).unwrap();
        let jail = st.jail.clone().expect("jailed by default");
        let paths = f.rt.paths(id).unwrap();
        assert_eq!(jail.root, paths.jail);
        assert_eq!(jail.gid, jail.uid);
        assert_eq!(f.rt.store.load(id).unwrap().jail, Some(jail.clone()));
        // a directory of its own, root's (the runtime's), 0755, beside what the guest writes
        let meta = std::fs::metadata(&jail.root).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert!(!jail.root.starts_with(&paths.shared) && !jail.root.starts_with(&paths.stage));
        assert!(paths.vsock.starts_with(&jail.root));
        // the description says so
        let desc = vm_json(&f, id);
        assert_eq!(desc["jail"]["root"], jail.root.display().to_string());
        assert_eq!(desc["jail"]["uid"], jail.uid);
        assert_eq!(desc["jail"]["gid"], jail.uid);
        assert_eq!(desc["jail"]["net_namespace"], true);
        assert_eq!(desc["jail"]["rlimits"]["nofile"], 4096);
        assert_eq!(desc["vsock"]["uds_path"], paths.vsock.display().to_string());
        let parsed: carapace_vm_config::VmConfig = serde_json::from_value(desc).unwrap();
        parsed
            .jail
            .unwrap()
            .validate(Some(&paths.vsock))
            .expect("the VMM accepts it");
        uids.push(jail.uid);
    }
    assert_ne!(uids[0], uids[1], "two sandboxes, two uids");
    let mut claimed = uids.clone();
    claimed.sort();
    assert_eq!(f.jail_claims(), claimed);
    f.rt.delete("c1", true).unwrap();
    assert_eq!(f.jail_claims(), [uids[1]]);
    f.rt.delete("c2", true).unwrap();
    f.assert_clean();
}

#[test]
fn no_free_uid_fails_the_create_naming_the_range_and_leaves_nothing_of_it() {
    let mut f = fixture(Setup::default());
    f.rt.config.jail.uid_count = 1;
    let first = f.rt.create("c1", &f.bundle).unwrap();
    let err = f.rt.create("c2", &f.bundle).unwrap_err();
    let chain = carapace_errors::chain(&err);
    for want in ["no free uid", "jail.uid_count", "1879048192..=1879048192"] {
        assert!(chain.contains(want), "{want} missing: {chain}");
    }
    // nothing of c2 was started or left; c1 keeps its uid
    assert_eq!(
        f.events(),
        ["fsd", "vmm", "create_sandbox", "create_container"]
    );
    assert!(!f.tmp.path().join("run/c2").exists());
    assert_eq!(f.jail_claims(), [first.jail.unwrap().uid]);
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
    // the id is free again
    let again = f.rt.create("c2", &f.bundle).unwrap();
    assert_eq!(again.jail.unwrap().uid, 1_879_048_192);
    f.rt.delete("c2", true).unwrap();
    f.assert_clean();
}

#[test]
fn the_uid_of_a_sandbox_that_vanished_is_taken_over() {
    let mut f = fixture(Setup::default());
    f.rt.config.jail.uid_count = 1;
    // a sandbox that crashed and whose directory was removed by hand left its claim
    let claims = f.tmp.path().join("run").join(crate::jail::CLAIMS_DIR);
    std::fs::create_dir_all(&claims).unwrap();
    std::fs::write(
        claims.join("1879048192"),
        format!("{}\n", f.tmp.path().join("run/gone").display()),
    )
    .unwrap();
    let st = f.rt.create("c1", &f.bundle).unwrap();
    assert_eq!(st.jail.unwrap().uid, 1_879_048_192);
    assert_eq!(
        std::fs::read_to_string(claims.join("1879048192")).unwrap(),
        format!("{}\n", f.tmp.path().join("run/c1").display())
    );
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}

#[test]
fn a_vmm_killed_by_sigkill_is_cleaned_up_with_its_uid() {
    let f = fixture(Setup::default());
    let st = f.rt.create("c1", &f.bundle).unwrap();
    f.rt.start("c1").unwrap();
    let vmm = st.vmm.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(vmm.wait_gone(Duration::from_secs(5)));
    assert_eq!(f.rt.state("c1").unwrap().status, "stopped");
    assert_eq!(f.jail_claims(), [st.jail.unwrap().uid], "held until delete");
    f.rt.delete("c1", false).unwrap();
    f.assert_clean();
}

#[test]
fn jail_off_gives_a_vmm_without_a_jail_section_or_uid() {
    let mut f = fixture(Setup::default());
    f.rt.config.jail.enabled = false;
    let st = f.rt.create("c1", &f.bundle).unwrap();
    assert_eq!(st.jail, None);
    assert!(vm_json(&f, "c1").get("jail").is_none());
    assert_eq!(f.jail_claims(), Vec::<u32>::new());
    // the socket still lives in the jail directory
    assert!(f.rt.paths("c1").unwrap().vsock.exists());
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}

#[test]
fn every_state_root_of_a_configuration_shares_the_claims() {
    // `carapace --root` elsewhere (containerd's runc shim gives one root per namespace):
    // the claims stay under runtime.state_dir, so two roots never hand out one uid.
    let mut f = fixture(Setup::default());
    let a = f.rt.create("c1", &f.bundle).unwrap().jail.unwrap();
    let main_store = f.rt.store.clone();
    f.rt.store = crate::state::StateStore::new(f.tmp.path().join("other-root"));
    let b = f.rt.create("c1", &f.bundle).unwrap().jail.unwrap();
    assert_ne!(a.uid, b.uid);
    assert!(b.root.starts_with(f.tmp.path().join("other-root")));
    let mut both = vec![a.uid, b.uid];
    both.sort();
    assert_eq!(f.jail_claims(), both);
    f.rt.delete("c1", true).unwrap();
    assert_eq!(f.jail_claims(), [a.uid]);
    f.rt.store = main_store;
    f.rt.delete("c1", true).unwrap();
    f.assert_clean();
}
