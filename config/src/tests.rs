use super::*;
use std::io::Write;

fn parse(text: &str) -> Result<Config, ConfigError> {
    let c = Config::parse(text, Path::new("/etc/test.toml"))?;
    c.validate(&Origin::File("/etc/test.toml".into()))?;
    Ok(c)
}

#[test]
fn shipped_file_documents_exactly_the_defaults() {
    let shipped = Config::parse(SHIPPED, Path::new("configuration.toml")).expect("parses");
    assert_eq!(shipped, Config::default());
    Config::default()
        .validate(&Origin::Defaults)
        .expect("valid");
}

#[test]
fn shipped_second_shape_is_valid() {
    let large = parse(include_str!("../configuration-large.toml")).expect("valid");
    assert_eq!(large.hypervisor.default_vcpus, 2);
    assert_eq!(large.hypervisor.default_memory_mib, 2048);
    assert_eq!(large.fs, Config::default().fs);
}

#[test]
fn empty_file_means_defaults_and_partial_files_override_keys() {
    assert_eq!(parse("").expect("empty"), Config::default());
    let c = parse(
        "[hypervisor]\ndefault_vcpus = 2\n[fs]\ndaemon = \"virtiofsd\"\ncache = \"never\"\n\
         [jail]\nfs_daemon = false\n",
    )
    .expect("partial");
    assert_eq!(c.hypervisor.default_vcpus, 2);
    assert_eq!(c.hypervisor.default_memory_mib, 256);
    assert_eq!(c.fs.daemon, FsDaemon::Virtiofsd);
    assert_eq!(c.fs.cache.as_flag(), "never");
}

#[test]
fn unknown_keys_are_rejected_with_file_and_key() {
    let err = parse("[hypervisor]\nmemory = 5\n").expect_err("unknown key");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err).expect("source")
    );
    assert!(chain.contains("/etc/test.toml"), "{chain}");
    assert!(chain.contains("memory"), "{chain}");
    let err = parse("[gpu]\n").expect_err("unknown table");
    assert!(matches!(err, ConfigError::Parse { .. }));
}

#[test]
fn wrong_enum_values_are_rejected() {
    assert!(parse("[fs]\ncache = \"sometimes\"\n").is_err());
    assert!(parse("[fs]\ndaemon = \"9p\"\n").is_err());
    assert!(parse("[debug]\nlog_level = \"loud\"\n").is_err());
    assert!(parse("[network]\nvhost_net = \"yes\"\n").is_err());
    assert!(parse("[network]\nvhost = \"on\"\n").is_err());
}

#[test]
fn vhost_net_defaults_to_auto() {
    assert_eq!(Config::default().network.vhost_net, VhostNetMode::Auto);
    for (text, mode) in [
        ("auto", VhostNetMode::Auto),
        ("on", VhostNetMode::On),
        ("off", VhostNetMode::Off),
    ] {
        let c = parse(&format!("[network]\nvhost_net = \"{text}\"\n")).expect(text);
        assert_eq!(c.network.vhost_net, mode);
        assert_eq!(mode.as_str(), text);
    }
}

#[test]
fn validation_names_the_key() {
    let cases = [
        (
            "[hypervisor]\ndefault_vcpus = 0\n",
            "hypervisor.default_vcpus",
        ),
        (
            "[hypervisor]\ndefault_vcpus = 9\n",
            "hypervisor.default_vcpus",
        ),
        ("[hypervisor]\nmax_vcpus = 300\n", "hypervisor.max_vcpus"),
        (
            "[hypervisor]\ndefault_memory_mib = 16\n",
            "hypervisor.default_memory_mib",
        ),
        (
            "[hypervisor]\nmax_memory_mib = 128\n",
            "hypervisor.max_memory_mib",
        ),
        ("[hypervisor]\nkernel = \"vmlinux\"\n", "hypervisor.kernel"),
        ("[runtime]\nstate_dir = \"run\"\n", "runtime.state_dir"),
        ("[agent]\nboot_timeout_ms = 0\n", "agent.boot_timeout_ms"),
        (
            "[hypervisor]\nkernel_params = \"a\\nb\"\n",
            "hypervisor.kernel_params",
        ),
        ("[jail]\nuid_base = 0\n", "jail.uid_base"),
        ("[jail]\nuid_base = 999\n", "jail.uid_base"),
        ("[jail]\nuid_count = 0\n", "jail.uid_count"),
        (
            "[jail]\nuid_base = 2147483000\nuid_count = 1000\n",
            "jail.uid_count",
        ),
        ("[jail]\nnofile = 10\n", "jail.nofile"),
        ("[jail]\nfs_uid_base = 5\n", "jail.fs_uid_base"),
        ("[jail]\nfs_ids = 10\n", "jail.fs_ids"),
        (
            "[fs]\ndaemon = \"virtiofsd\"\n[jail]\nfs_daemon = true\n",
            "jail.fs_daemon",
        ),
        // on by default: naming virtiofsd alone is refused, never run unjailed silently
        ("[fs]\ndaemon = \"virtiofsd\"\n", "jail.fs_daemon"),
        ("[jail]\nuid_count = 65536\n", "jail.fs_ids"),
        (
            "[jail]\nuid_base = 1879113728\nuid_count = 10\n",
            "jail.fs_uid_base",
        ),
        ("[jail]\nnproc = 1\n", "jail.nproc"),
        // checked even when off, so that turning it on cannot reveal a bad range
        ("[jail]\nenabled = false\nuid_count = 0\n", "jail.uid_count"),
    ];
    for (text, key) in cases {
        match parse(text) {
            Err(ConfigError::Invalid { key: k, origin, .. }) => {
                assert_eq!(k, key, "{text}");
                assert_eq!(origin, Origin::File("/etc/test.toml".into()));
            }
            other => panic!("{text}: expected Invalid({key}), got {other:?}"),
        }
    }
}

#[test]
fn jail_is_on_by_default_in_a_range_of_its_own() {
    let j = Config::default().jail;
    assert!(j.enabled);
    assert_eq!((j.uid_base, j.uid_count), (0x7000_0000, 4_000));
    assert!(j.uid_end() <= u64::from(j.fs_uid_base));
    assert!(j.fs_daemon, "the fs daemon is jailed too");
    // The fs blocks end below systemd's foreign range (0x7FFE0000).
    assert!(j.fs_end() <= 0x7FFE_0000, "{:#x}", j.fs_end());
    assert_eq!(j.fs_block(0x7000_0000), Some((0x7001_0000, 65_536)));
    assert_eq!(j.fs_block(0x7000_0002), Some((0x7003_0000, 65_536)));
    assert_eq!(j.fs_block(0x7000_0000 + 4_000), None);
    assert_eq!(j.fs_block(5), None);
    let c = parse("[jail]\nenabled = false\nuid_base = 200000\nuid_count = 10\n").expect("valid");
    assert!(!c.jail.enabled);
    assert_eq!((c.jail.uid_base, c.jail.uid_count), (200_000, 10));
    // the range may end exactly at 2^31
    parse("[jail]\nuid_base = 2147483000\nuid_count = 648\n").expect("ends at 2^31");
    assert!(parse("[jail]\nuid = 5\n").is_err(), "unknown key");
    assert!(parse("[jail]\nenabled = \"yes\"\n").is_err());
}

#[test]
fn locate_prefers_flag_then_env_then_default() {
    let (p, explicit) = locate(Some(Path::new("/a")), Some(Path::new("/b")));
    assert_eq!((p, explicit), (PathBuf::from("/a"), true));
    let (p, explicit) = locate(None, Some(Path::new("/b")));
    assert_eq!((p, explicit), (PathBuf::from("/b"), true));
    let (p, explicit) = locate(None, None);
    assert_eq!((p, explicit), (PathBuf::from(DEFAULT_PATH), false));
}

#[test]
fn load_reads_files_and_refuses_a_missing_explicit_one() {
    let mut f = tempfile::NamedTempFile::new().expect("temp");
    writeln!(f, "[debug]\nlog_level = \"debug\"").expect("write");
    let loaded = load(Some(f.path()), None).expect("load");
    assert_eq!(loaded.config.debug.log_level, LogLevel::Debug);
    assert_eq!(loaded.origin, Origin::File(f.path().to_path_buf()));

    let missing = Path::new("/nonexistent/carapace.toml");
    let err = load(Some(missing), None).expect_err("missing");
    assert!(matches!(err, ConfigError::Read { ref path, .. } if path == missing));
    assert!(err.to_string().contains("/nonexistent/carapace.toml"));
}

#[test]
fn vm_is_sized_from_container_limits_and_capped() {
    let c = Config::default();
    assert_eq!(
        c.vm_resources(&[]),
        VmResources {
            vcpus: 1,
            memory_mib: 256
        }
    );
    let limits = [
        ContainerLimits {
            cpu_quota_us: Some(150_000),
            cpu_period_us: Some(100_000),
            memory_limit_bytes: Some(512 << 20),
        },
        ContainerLimits {
            cpu_quota_us: Some(-1), // unlimited
            cpu_period_us: Some(100_000),
            memory_limit_bytes: Some((100 << 20) + 1),
        },
    ];
    assert_eq!(
        c.vm_resources(&limits),
        VmResources {
            vcpus: 3,
            memory_mib: 256 + 512 + 101
        }
    );
    let huge = [ContainerLimits {
        cpu_quota_us: Some(i64::MAX),
        cpu_period_us: Some(1),
        memory_limit_bytes: Some(i64::MAX),
    }];
    assert_eq!(
        c.vm_resources(&huge),
        VmResources {
            vcpus: 8,
            memory_mib: 16384
        }
    );
}
