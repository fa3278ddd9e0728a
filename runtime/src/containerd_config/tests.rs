use super::*;

/// Debian bookworm's own /etc/containerd/config.toml, with a comment of the admin's.
const DEBIAN: &str = r#"version = 2

# set by the admin
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(main: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = main {
            fs::write(dir.path().join("config.toml"), text).unwrap();
        }
        Node { dir }
    }
    fn main(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }
    fn drop_in(&self) -> PathBuf {
        self.dir.path().join("conf.d/carapace.toml")
    }
    fn plan(&self) -> Result<Plan, ContainerdConfigError> {
        plan(
            &self.main(),
            &self.drop_in(),
            &Handler {
                name: "carapace",
                config_path: Some(Path::new("/etc/carapace/configuration.toml")),
            },
        )
    }
    /// Writes a plan as `carapace containerd-config` does.
    fn apply(&self, plan: &Plan) {
        fs::create_dir_all(self.drop_in().parent().unwrap()).unwrap();
        fs::write(self.drop_in(), &plan.drop_in).unwrap();
        if let Some(main) = &plan.main {
            fs::write(self.main(), main).unwrap();
        }
    }
}

fn cri(drop_in: &str) -> toml::Table {
    let t: toml::Table = drop_in.parse().expect("the drop-in is TOML");
    assert_eq!(t["version"].as_integer(), Some(2));
    t["plugins"][CRI_PLUGIN].as_table().unwrap().clone()
}

#[test]
fn the_drop_in_keeps_the_nodes_cri_section_and_adds_the_handler() {
    let node = Node::new(Some(DEBIAN));
    let plan = node.plan().unwrap();
    let cri = cri(&plan.drop_in);
    // Without the node's settings containerd 1.6 would fall back to /opt/cni/bin.
    assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/usr/lib/cni"));
    let entry = &cri["containerd"]["runtimes"]["carapace"];
    assert_eq!(entry["runtime_type"].as_str(), Some(RUNTIME_TYPE));
    assert_eq!(
        entry["privileged_without_host_devices"].as_bool(),
        Some(true)
    );
    assert_eq!(
        entry["options"]["ConfigPath"].as_str(),
        Some("/etc/carapace/configuration.toml")
    );
    // containerd's default runc, which a runtimes table of ours alone would drop
    assert_eq!(
        cri["containerd"]["runtimes"]["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    // Only the CRI section: other plugins stay the main file's alone.
    let all: toml::Table = plan.drop_in.parse().unwrap();
    assert_eq!(all["plugins"].as_table().unwrap().len(), 1);
    assert_eq!(plan.sources, vec![node.main()]);
    let main = plan.main.expect("the main file gains the import");
    assert!(!plan.main_created);
    let drop_in = node.drop_in().display().to_string();
    assert!(
        main.contains(&format!("imports = [\"{drop_in}\"]")),
        "{main}"
    );
    assert!(
        main.contains("# set by the admin"),
        "formatting kept: {main}"
    );
    assert!(
        main.contains("path = \"/var/lib/containerd/opt\""),
        "{main}"
    );
}

#[test]
fn a_second_run_changes_nothing() {
    let node = Node::new(Some(DEBIAN));
    let first = node.plan().unwrap();
    node.apply(&first);
    let second = node.plan().unwrap();
    assert_eq!(second.main, None, "the import is there already");
    assert_eq!(second.drop_in, first.drop_in);
}

#[test]
fn runtimes_the_node_names_are_kept_and_no_runc_is_added_to_them() {
    let node = Node::new(Some(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"crun\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.crun]\n  runtime_type = \"io.containerd.runc.v2\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.crun.options]\n    BinaryName = \"/usr/bin/crun\"\n    SystemdCgroup = true\n",
    ));
    let cri = cri(&node.plan().unwrap().drop_in);
    let runtimes = cri["containerd"]["runtimes"].as_table().unwrap();
    assert_eq!(runtimes.len(), 2, "{runtimes:?}");
    assert_eq!(
        runtimes["crun"]["options"]["SystemdCgroup"].as_bool(),
        Some(true)
    );
    assert!(runtimes.contains_key("carapace"));
}

#[test]
fn an_import_pattern_covering_the_drop_in_is_enough() {
    let node = Node::new(Some(
        "version = 2\nimports = [\"conf.d/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:1\"\n",
    ));
    let plan = node.plan().unwrap();
    assert_eq!(plan.main, None);
    assert_eq!(
        cri(&plan.drop_in)["sandbox_image"].as_str(),
        Some("pause:1")
    );
}

#[test]
fn the_last_imported_cri_section_wins_and_the_old_drop_in_is_ignored() {
    let node = Node::new(Some(&format!(
        "version = 2\nimports = [\"/nonexistent-dir-is-fine/x.toml\", \"conf.d/*.toml\"]\n{}",
        "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"main\"\n"
    )));
    let conf_d = node.dir.path().join("conf.d");
    fs::create_dir_all(&conf_d).unwrap();
    fs::write(
        conf_d.join("50-gpu.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"gpu\"\n",
    )
    .unwrap();
    fs::write(
        conf_d.join("10-other.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"other\"\n",
    )
    .unwrap();
    // the previous drop-in (sorted last) is never its own source
    fs::write(
        node.drop_in(),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"stale\"\n",
    )
    .unwrap();
    // A plain path that does not exist is containerd's error, not ours: reported as unreadable.
    let err = node.plan().unwrap_err();
    assert!(
        matches!(&err, ContainerdConfigError::Read { path, .. } if path.ends_with("x.toml")),
        "{err}"
    );
    fs::write(
        node.main(),
        "version = 2\nimports = [\"conf.d/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"main\"\n",
    )
    .unwrap();
    let plan = node.plan().unwrap();
    assert_eq!(cri(&plan.drop_in)["sandbox_image"].as_str(), Some("gpu"));
    assert_eq!(
        plan.sources,
        vec![
            node.main(),
            conf_d.join("10-other.toml"),
            conf_d.join("50-gpu.toml")
        ]
    );
}

#[test]
fn a_missing_main_file_is_created_with_the_import() {
    let node = Node::new(None);
    let plan = node.plan().unwrap();
    assert!(plan.main_created);
    let main = plan.main.unwrap();
    let t: toml::Table = main.parse().unwrap();
    assert_eq!(t["version"].as_integer(), Some(2));
    assert_eq!(
        t["imports"].as_array().unwrap()[0].as_str(),
        Some(node.drop_in().to_str().unwrap())
    );
    assert!(plan.sources.is_empty());
    assert!(cri(&plan.drop_in)["containerd"]["runtimes"]["carapace"].is_table());
}

#[test]
fn bad_input_is_named() {
    let node = Node::new(Some("[plugins]\n"));
    let e = node.plan().unwrap_err().to_string();
    assert!(
        e.contains("no `version`") && e.contains("config.toml"),
        "{e}"
    );
    fs::write(node.main(), "version = 3\n").unwrap();
    assert!(node.plan().unwrap_err().to_string().contains("version = 3"));
    fs::write(node.main(), "version = 2\nimports = \"x\"\n").unwrap();
    assert!(
        node.plan()
            .unwrap_err()
            .to_string()
            .contains("`imports` is not an array")
    );
    fs::write(node.main(), "version = 2\nimports = [\"/etc/*/x.toml\"]\n").unwrap();
    assert!(matches!(
        node.plan().unwrap_err(),
        ContainerdConfigError::Pattern { .. }
    ));
    fs::write(node.main(), "version = 2\n[plugins\n").unwrap();
    assert!(matches!(
        node.plan().unwrap_err(),
        ContainerdConfigError::Parse { .. }
    ));
    fs::write(node.main(), DEBIAN).unwrap();
    let bad = |name: &str, cfg: &str| {
        plan(
            &node.main(),
            &node.drop_in(),
            &Handler {
                name,
                config_path: Some(Path::new(cfg)),
            },
        )
        .unwrap_err()
    };
    assert!(matches!(
        bad("", "/c.toml"),
        ContainerdConfigError::Handler(_)
    ));
    assert!(matches!(
        bad("a.b", "/c.toml"),
        ContainerdConfigError::Handler(_)
    ));
    assert!(matches!(
        bad("carapace", "c.toml"),
        ContainerdConfigError::NotAbsolute { .. }
    ));
}

#[test]
fn remove_takes_out_only_the_drop_ins_own_import() {
    let node = Node::new(Some(DEBIAN));
    let plan = node.plan().unwrap();
    node.apply(&plan);
    let restored = remove(&node.main(), &node.drop_in()).unwrap().unwrap();
    assert_eq!(restored, DEBIAN, "the file is as it was");
    fs::write(node.main(), &restored).unwrap();
    assert_eq!(remove(&node.main(), &node.drop_in()).unwrap(), None);
    fs::write(
        node.main(),
        "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n",
    )
    .unwrap();
    assert_eq!(
        remove(&node.main(), &node.drop_in()).unwrap(),
        None,
        "a pattern is not ours"
    );
    assert_eq!(
        remove(&node.dir.path().join("none.toml"), &node.drop_in()).unwrap(),
        None
    );
    // other imports stay
    fs::write(
        node.main(),
        format!(
            "version = 2\nimports = [\"/a.toml\", \"{}\"]\n",
            node.drop_in().display()
        ),
    )
    .unwrap();
    let kept = remove(&node.main(), &node.drop_in()).unwrap().unwrap();
    assert_eq!(kept, "version = 2\nimports = [\"/a.toml\"]\n");
}

#[test]
fn wildcards_match_like_go_globs_in_the_last_component() {
    assert!(wildcard(b"*.toml", b"carapace.toml"));
    assert!(wildcard(b"*", b""));
    assert!(wildcard(b"a?c", b"abc"));
    assert!(!wildcard(b"*.toml", b"carapace.tom"));
    assert!(!wildcard(b"a?c", b"ac"));
    assert!(matches_pattern(
        Path::new("/etc/containerd/conf.d/*.toml"),
        Path::new("/etc/containerd/conf.d/carapace.toml")
    ));
    assert!(!matches_pattern(
        Path::new("/etc/containerd/*.toml"),
        Path::new("/etc/containerd/conf.d/carapace.toml")
    ));
}
