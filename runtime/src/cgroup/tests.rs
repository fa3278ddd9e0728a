use super::*;

#[test]
fn cgroupfs_paths_are_taken_as_they_are() {
    assert_eq!(
        relative("/kubepods/burstable/pod12/abc").unwrap(),
        PathBuf::from("kubepods/burstable/pod12/abc")
    );
    assert_eq!(relative("k8s.io/abc").unwrap(), PathBuf::from("k8s.io/abc"));
}

#[test]
fn systemd_paths_expand_their_slice() {
    assert_eq!(
        relative("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap(),
        PathBuf::from(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
        )
    );
    assert_eq!(
        relative("system.slice::abc").unwrap(),
        PathBuf::from("system.slice/abc.scope")
    );
    assert_eq!(
        relative(":cri:abc").unwrap(),
        PathBuf::from("cri-abc.scope")
    );
}

#[test]
fn paths_that_name_nothing_safe_are_refused() {
    for bad in [
        "/",
        "",
        "/a/../../etc",
        "a/./b",
        "x.slice:p:",
        "a:b",
        "-bad-.slice:p:n",
        "a--b.slice:p:n",
        "noslice:p:n",
        "a.slice:p/q:n",
    ] {
        assert!(
            matches!(relative(bad), Err(CgroupError::InvalidPath { .. })),
            "{bad:?} accepted"
        );
    }
}

/// A fake cgroup tree: v2 (`cgroup.controllers` at the root) or v1 (hierarchies with
/// `cgroup.procs`, a cpuset one with values, a symlinked alias).
fn fake_tree(v2: bool) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    if v2 {
        std::fs::write(r.join("cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(r.join("cgroup.procs"), "").unwrap();
    } else {
        for h in ["cpu,cpuacct", "memory", "cpuset"] {
            std::fs::create_dir(r.join(h)).unwrap();
            std::fs::write(r.join(h).join("cgroup.procs"), "").unwrap();
        }
        std::fs::write(r.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(r.join("cpuset/cpuset.mems"), "0\n").unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", r.join("cpu")).unwrap();
        std::fs::create_dir(r.join("not-a-hierarchy")).unwrap();
    }
    root
}

#[test]
fn hierarchies_of_v1_and_v2() {
    let v2 = fake_tree(true);
    assert_eq!(
        hierarchies(v2.path()).unwrap(),
        vec![v2.path().to_path_buf()]
    );
    let v1 = fake_tree(false);
    let names: Vec<_> = hierarchies(v1.path())
        .unwrap()
        .into_iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["cpu,cpuacct", "cpuset", "memory"]);
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        hierarchies(empty.path()),
        Err(CgroupError::NotMounted(_))
    ));
}

#[test]
fn create_makes_what_is_missing_and_remove_takes_only_that() {
    let v1 = fake_tree(false);
    let r = v1.path();
    // the pod's directory exists already in one hierarchy (the kubelet's): kept
    std::fs::create_dir_all(r.join("memory/kubepods/pod1")).unwrap();
    let cg = create(r, "/kubepods/pod1/sandbox").unwrap();
    assert_eq!(cg.dirs.len(), 3);
    for d in &cg.dirs {
        assert!(d.is_dir() && d.ends_with("kubepods/pod1/sandbox"), "{d:?}");
    }
    // a new cpuset directory gets its parent's CPUs and memory nodes, level by level
    let leaf = r.join("cpuset/kubepods/pod1/sandbox");
    assert_eq!(std::fs::read_to_string(leaf.join("cpuset.cpus")).ok(), None);
    // (a plain directory has no cpuset files: nothing to copy; on a real cpuset the
    // kernel creates them empty and they are filled)
    std::fs::write(r.join("cpuset/kubepods/cpuset.cpus"), "").unwrap();
    std::fs::write(r.join("cpuset/kubepods/cpuset.mems"), "").unwrap();
    inherit_cpuset(&r.join("cpuset"), &r.join("cpuset/kubepods")).unwrap();
    assert_eq!(
        std::fs::read_to_string(r.join("cpuset/kubepods/cpuset.cpus")).unwrap(),
        "0-1"
    );
    // deepest first; the kubelet's memory/kubepods/pod1 is not ours
    let at = |p: &Path| cg.created.iter().position(|c| c == p).unwrap();
    for d in &cg.dirs {
        if d.starts_with(r.join("memory")) {
            continue;
        }
        assert!(at(d) < at(d.parent().unwrap()), "{:?}", cg.created);
    }
    assert!(!cg.created.contains(&r.join("memory/kubepods/pod1")));
    assert!(cg.created.contains(&r.join("memory/kubepods/pod1/sandbox")));
    assert!(cg.created.contains(&r.join("cpuset/kubepods")));
    // a file the test left in one directory makes it unremovable: reported, the rest goes
    std::fs::remove_file(r.join("cpuset/kubepods/cpuset.cpus")).unwrap();
    std::fs::remove_file(r.join("cpuset/kubepods/cpuset.mems")).unwrap();
    assert!(remove(&cg).is_empty());
    assert!(!r.join("cpu,cpuacct/kubepods").exists());
    assert!(!r.join("cpuset/kubepods").exists());
    assert!(r.join("memory/kubepods/pod1").is_dir());
    assert!(!r.join("memory/kubepods/pod1/sandbox").exists());
}

#[test]
fn v2_controllers_are_passed_down_to_the_sandbox() {
    let v2 = fake_tree(true);
    let r = v2.path();
    // the kubelet's pod level exists and passes cpu on already; memory is missing
    std::fs::create_dir(r.join("kubepods")).unwrap();
    std::fs::write(r.join("kubepods/cgroup.controllers"), "cpu memory\n").unwrap();
    std::fs::write(r.join("kubepods/cgroup.subtree_control"), "cpu\n").unwrap();
    let cg = create(r, "/kubepods/sandbox").unwrap();
    assert_eq!(
        std::fs::read_to_string(r.join("cgroup.subtree_control")).unwrap(),
        "+cpu +memory +pids"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("kubepods/cgroup.subtree_control")).unwrap(),
        "+memory"
    );
    // with cpuset passed down, a v2 directory has an empty cpuset.cpus (the parent's
    // CPUs) and the root has none: nothing is copied, nothing fails (a second pod once
    // failed here: "reading /sys/fs/cgroup/cpuset.cpus")
    std::fs::write(r.join("kubepods/sandbox/cpuset.cpus"), "").unwrap();
    inherit_cpuset(r, &r.join("kubepods/sandbox")).unwrap();
    assert_eq!(
        std::fs::read_to_string(r.join("kubepods/sandbox/cpuset.cpus")).unwrap(),
        ""
    );
    std::fs::remove_file(r.join("kubepods/sandbox/cpuset.cpus")).unwrap();
    // the leaf passes nothing on (it holds the helpers)
    assert!(!r.join("kubepods/sandbox/cgroup.subtree_control").exists());
    std::fs::remove_file(r.join("kubepods/cgroup.controllers")).unwrap();
    std::fs::remove_file(r.join("kubepods/cgroup.subtree_control")).unwrap();
    assert!(remove(&cg).is_empty());
}

#[test]
fn a_failed_create_leaves_nothing() {
    let v2 = fake_tree(true);
    // a file where a directory must go
    std::fs::write(v2.path().join("blocker"), "").unwrap();
    let e = create(v2.path(), "/blocker/x").unwrap_err();
    assert!(matches!(e, CgroupError::Io { .. }), "{e}");
    let e = create(v2.path(), "/ok/../x").unwrap_err();
    assert!(matches!(e, CgroupError::InvalidPath { .. }), "{e}");
    let left: Vec<_> = std::fs::read_dir(v2.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
}

#[test]
fn joined_opens_every_leaf() {
    let v2 = fake_tree(true);
    let cg = create(v2.path(), "/a/b").unwrap();
    std::fs::write(cg.dirs[0].join("cgroup.procs"), "").unwrap();
    assert_eq!(Joined::open(&cg).unwrap().fds().len(), 1);
    std::fs::remove_file(cg.dirs[0].join("cgroup.procs")).unwrap();
    let missing = HostCgroup {
        dirs: vec![v2.path().join("nowhere")],
        created: vec![],
    };
    assert!(Joined::open(&missing).is_err());
    assert!(remove(&cg).is_empty());
}

#[test]
fn a_parent_shared_with_another_sandbox_is_left_to_it() {
    // ctr's cgroups paths /<namespace>/<id>: the first sandbox makes /<namespace> too
    let v2 = fake_tree(true);
    let r = v2.path();
    let first = create(r, "/ns/c1").unwrap();
    assert!(first.created.contains(&r.join("ns")));
    let second = create(r, "/ns/c2").unwrap();
    assert!(!second.created.contains(&r.join("ns")));
    // the first goes while the second lives: its leaf goes, the shared parent stays
    assert_eq!(remove(&first), Vec::<String>::new());
    assert!(!r.join("ns/c1").exists());
    assert!(r.join("ns/c2").is_dir());
    assert_eq!(remove(&second), Vec::<String>::new());
    assert!(!r.join("ns/c2").exists());
}
