use super::*;

fn sandbox(root: &Path, id: &str) -> PathBuf {
    let dir = root.join(id);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn claims_are_unique_start_at_the_id_hash_and_are_released() {
    let tmp = tempfile::tempdir().unwrap();
    let claims = UidClaims::new(tmp.path());
    let range = UidRange {
        base: 500_000,
        count: 8,
    };
    let mut got = Vec::new();
    for i in 0..8 {
        let id = format!("s{i}");
        let uid = claims.claim(range, &id, &sandbox(tmp.path(), &id)).unwrap();
        assert!(range.contains(u64::from(uid)), "{uid}");
        got.push(uid);
    }
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 8, "every sandbox its own id: {got:?}");
    // The first claim of a sandbox lands where its id hashes to.
    assert_eq!(got[0], range.base + range.start("s0"));
    // The claim names its sandbox directory.
    let claim = claims.dir().join(got[3].to_string());
    assert_eq!(
        fs::read_to_string(&claim).unwrap(),
        format!("{}\n", tmp.path().join("s3").display())
    );
    assert_eq!(claims.usage(range).unwrap(), Usage { live: 8, stale: 0 });
    // Another sandbox cannot release it; its own can, once.
    assert!(!claims.release(got[3], &tmp.path().join("s4")).unwrap());
    assert!(claim.exists());
    assert!(claims.release(got[3], &tmp.path().join("s3")).unwrap());
    assert!(!claim.exists());
    assert!(!claims.release(got[3], &tmp.path().join("s3")).unwrap());
    // The freed id goes to the next sandbox.
    let uid = claims
        .claim(range, "s9", &sandbox(tmp.path(), "s9"))
        .unwrap();
    assert_eq!(uid, got[3]);
    // once the last claim is given back, nothing of the claims is left
    for (i, uid) in got.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert!(
            claims
                .release(*uid, &tmp.path().join(format!("s{i}")))
                .unwrap()
        );
        assert!(claims.dir().exists());
    }
    assert!(claims.release(uid, &tmp.path().join("s9")).unwrap());
    assert!(!claims.dir().exists(), "claims directory left");
    // and the next claim makes it again
    claims.claim(range, "s0", &tmp.path().join("s0")).unwrap();
    assert_eq!(claims.usage(range).unwrap().live, 1);
}

#[test]
fn a_full_range_is_an_error_naming_the_range_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let claims = UidClaims::new(tmp.path());
    let range = UidRange {
        base: 1_879_048_192,
        count: 2,
    };
    for id in ["a", "b"] {
        claims.claim(range, id, &sandbox(tmp.path(), id)).unwrap();
    }
    let e = claims
        .claim(range, "c", &sandbox(tmp.path(), "c"))
        .unwrap_err();
    assert!(matches!(e, JailError::Exhausted { .. }), "{e}");
    let msg = e.to_string();
    for want in ["1879048192..=1879048193", "jail.uid_count", ".jail-uids"] {
        assert!(msg.contains(want), "{want} missing: {msg}");
    }
}

#[test]
fn claims_of_gone_sandboxes_are_taken_over_and_others_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let claims = UidClaims::new(tmp.path());
    let range = UidRange {
        base: 700_000,
        count: 3,
    };
    let dirs: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|id| sandbox(tmp.path(), id))
        .collect();
    let uids: Vec<u32> = ["a", "b", "c"]
        .iter()
        .zip(&dirs)
        .map(|(id, d)| claims.claim(range, id, d).unwrap())
        .collect();
    // b crashed: its directory is gone, its claim is not.
    fs::remove_dir_all(&dirs[1]).unwrap();
    // an empty claim (a crash between creating and writing it) is stale too
    fs::remove_file(claims.dir().join(uids[2].to_string())).unwrap();
    fs::write(claims.dir().join(uids[2].to_string()), b"").unwrap();
    assert_eq!(claims.usage(range).unwrap(), Usage { live: 1, stale: 2 });
    let d = sandbox(tmp.path(), "d");
    let e = sandbox(tmp.path(), "e");
    let mut taken = vec![
        claims.claim(range, "d", &d).unwrap(),
        claims.claim(range, "e", &e).unwrap(),
    ];
    taken.sort();
    let mut freed = vec![uids[1], uids[2]];
    freed.sort();
    assert_eq!(taken, freed, "the stale claims, never a's");
    assert_eq!(
        fs::read_to_string(claims.dir().join(uids[0].to_string())).unwrap(),
        format!("{}\n", dirs[0].display())
    );
    // a's release still works; nothing else is free
    assert!(matches!(
        claims.claim(range, "f", &sandbox(tmp.path(), "f")),
        Err(JailError::Exhausted { .. })
    ));
    assert!(claims.release(uids[0], &dirs[0]).unwrap());
}

#[test]
fn claims_outside_the_range_and_foreign_files_are_not_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let claims = UidClaims::new(tmp.path());
    let range = UidRange {
        base: 10_000,
        count: 4,
    };
    assert_eq!(
        claims.usage(range).unwrap(),
        Usage::default(),
        "no directory yet"
    );
    claims.claim(range, "a", &sandbox(tmp.path(), "a")).unwrap();
    fs::write(
        claims.dir().join("99999"),
        tmp.path().join("a").display().to_string(),
    )
    .unwrap();
    fs::write(claims.dir().join("notes"), b"x").unwrap();
    assert_eq!(claims.usage(range).unwrap(), Usage { live: 1, stale: 0 });
}

#[test]
fn concurrent_claims_from_many_threads_never_share_an_id() {
    let tmp = tempfile::tempdir().unwrap();
    let range = UidRange {
        base: 300_000,
        count: 64,
    };
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let root = tmp.path().to_path_buf();
            std::thread::spawn(move || {
                let claims = UidClaims::new(&root);
                let uids: Vec<u32> = (0..4)
                    .map(|i| {
                        let id = format!("t{t}-{i}");
                        claims.claim(range, &id, &sandbox(&root, &id)).unwrap()
                    })
                    .collect();
                // give back and claim again while others claim: the directory may
                // vanish under a waiter, which must take its lock again
                let id = format!("t{t}-0");
                assert!(claims.release(uids[0], &root.join(&id)).unwrap());
                let again = claims.claim(range, &id, &root.join(&id)).unwrap();
                let mut uids = uids;
                uids[0] = again;
                uids
            })
        })
        .collect();
    let mut all: Vec<u32> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 64, "64 sandboxes, 64 ids");
    let claims = UidClaims::new(tmp.path());
    assert_eq!(claims.usage(range).unwrap(), Usage { live: 64, stale: 0 });
}

#[test]
fn the_directory_emptied_under_waiters_is_made_again() {
    // many threads claim and give back a single id in turn: the claims directory is
    // removed and made again all the time, and no two threads ever hold the id at once
    let tmp = tempfile::tempdir().unwrap();
    let range = UidRange {
        base: 400_000,
        count: 1,
    };
    let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let root = tmp.path().to_path_buf();
            let held = held.clone();
            std::thread::spawn(move || {
                let claims = UidClaims::new(&root);
                let id = format!("t{t}");
                let dir = sandbox(&root, &id);
                let mut done = 0;
                while done < 20 {
                    match claims.claim(range, &id, &dir) {
                        Ok(uid) => {
                            let n = held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            assert_eq!(n, 0, "two holders of one id");
                            held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            assert!(claims.release(uid, &dir).unwrap());
                            done += 1;
                        }
                        Err(JailError::Exhausted { .. }) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(!UidClaims::new(tmp.path()).dir().exists());
}

#[test]
fn the_jail_directory_is_0755_and_the_description_section_has_the_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let root = make_root(tmp.path()).unwrap();
    assert_eq!(root, tmp.path().join("jail"));
    let meta = fs::metadata(&root).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert!(make_root(tmp.path()).is_err(), "never reused");
    let jail = carapace_config::Jail {
        nofile: 1000,
        ..Default::default()
    };
    let rec = JailRecord {
        uid: 1_879_048_200,
        gid: 1_879_048_200,
        root: root.clone(),
        fs: None,
    };
    let section = vm_section(&jail, &rec);
    assert_eq!((section.uid, section.gid), (rec.uid, rec.gid));
    assert!(section.net_namespace);
    assert_eq!(section.rlimits.nofile, 1000);
    assert_eq!(section.rlimits.nproc, jail.nproc);
    assert_eq!(section.rlimits.fsize, None);
    section.validate(Some(&root.join("vsock.sock"))).unwrap();
}
