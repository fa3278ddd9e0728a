use super::*;

fn downcast<M: containerd_shim::protos::protobuf::MessageFull>(
    ev: &(dyn ShimEvent + Send + Sync),
) -> &M {
    let m: &dyn containerd_shim::protos::protobuf::MessageDyn = ev;
    m.downcast_ref::<M>().expect("the expected message type")
}

#[test]
fn events_map_to_containerd_messages_and_topics() {
    let at = UNIX_EPOCH + std::time::Duration::from_millis(1_500);
    let exit = Exit { status: 3, at };
    let ev = to_shim_event(Event::Exit {
        id: "c1".into(),
        exec_id: String::new(),
        pid: 7,
        exit,
    });
    assert_eq!(ev.topic(), "/tasks/exit");
    let m = downcast::<TaskExit>(&*ev);
    assert_eq!((m.container_id.as_str(), m.id.as_str()), ("c1", "c1"));
    assert_eq!((m.pid, m.exit_status), (7, 3));
    assert_eq!((m.exited_at.seconds, m.exited_at.nanos), (1, 500_000_000));

    let ev = to_shim_event(Event::Exit {
        id: "c1".into(),
        exec_id: "e1".into(),
        pid: 8,
        exit,
    });
    let m = downcast::<TaskExit>(&*ev);
    assert_eq!(m.id, "e1");
    for (ev, topic) in [
        (
            Event::Start {
                id: "c".into(),
                pid: 1,
            },
            "/tasks/start",
        ),
        (
            Event::ExecAdded {
                id: "c".into(),
                exec_id: "e".into(),
            },
            "/tasks/exec-added",
        ),
        (
            Event::ExecStarted {
                id: "c".into(),
                exec_id: "e".into(),
                pid: 2,
            },
            "/tasks/exec-started",
        ),
        (
            Event::Delete {
                id: "c".into(),
                pid: 1,
                exit,
            },
            "/tasks/delete",
        ),
        (Event::Paused { id: "c".into() }, "/tasks/paused"),
        (Event::Resumed { id: "c".into() }, "/tasks/resumed"),
        (Event::Oom { id: "c".into() }, "/tasks/oom"),
    ] {
        assert_eq!(to_shim_event(ev).topic(), topic);
    }
    let m = downcast::<TaskOOM>(&*to_shim_event(Event::Oom { id: "c9".into() })).clone();
    assert_eq!(m.container_id, "c9");
}

#[test]
fn stats_become_cgroup_v2_metrics_in_an_any_containerd_decodes() {
    use containerd_shim::protos::protobuf::Message;
    let mut s = carapace_runtime::agent::ContainerStats::default();
    s.pids.mut_or_insert_default().current = 3;
    s.cpu.mut_or_insert_default().usage_usec = 1234;
    s.memory.mut_or_insert_default().usage = 8 << 20;
    s.memory.mut_or_insert_default().usage_limit = 32 << 20;
    s.memory_events.mut_or_insert_default().oom_kill = 1;
    s.io.mut_or_insert_default().usage.push(Default::default());
    let any = containerd_shim::util::convert_to_any(Box::new(to_metrics(&s))).expect("any");
    assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    let m = cg2::Metrics::parse_from_bytes(&any.value).expect("decodes");
    assert_eq!(m.pids.current, 3);
    assert_eq!(m.cpu.usage_usec, 1234);
    assert_eq!((m.memory.usage, m.memory.usage_limit), (8 << 20, 32 << 20));
    assert_eq!(m.memory_events.oom_kill, 1);
    assert_eq!(m.io.usage.len(), 1);
    // nothing reported, nothing made up
    let empty = to_metrics(&Default::default());
    assert!(empty.pids.is_none() && empty.memory.is_none() && empty.cpu.is_none());
}

#[test]
fn a_shim_serves_only_while_its_socket_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let derived = dir.path().join("derived.sock");
    let derived_addr = format!("unix://{}", derived.display());
    assert!(!shim_serving(dir.path(), &derived_addr), "nothing there");
    let recorded = dir.path().join("recorded.sock");
    std::fs::write(
        dir.path().join("address"),
        format!("unix://{}", recorded.display()),
    )
    .expect("address");
    for sock in [&derived, &recorded] {
        let listener = std::os::unix::net::UnixListener::bind(sock).expect("bind");
        assert!(
            shim_serving(dir.path(), &derived_addr),
            "{}",
            sock.display()
        );
        drop(listener);
        assert!(sock.exists());
        assert!(
            !shim_serving(dir.path(), &derived_addr),
            "a dead shim's socket file {}",
            sock.display()
        );
    }
}

#[test]
fn task_errors_become_the_codes_containerd_understands() {
    let e = status(TaskError::NotFound {
        kind: "container",
        id: "x".into(),
    });
    let containerd_shim::protos::ttrpc::Error::RpcStatus(s) = e else {
        panic!("an RPC status");
    };
    assert_eq!(s.code(), Code::NOT_FOUND);
    assert_eq!(s.message(), "container x not found");
    // CRI's stop path ignores only not-found errors from Kill
    let containerd_shim::protos::ttrpc::Error::RpcStatus(s) =
        status(TaskError::Finished { id: "x".into() })
    else {
        panic!("an RPC status");
    };
    assert_eq!(s.code(), Code::NOT_FOUND);
    let containerd_shim::protos::ttrpc::Error::RpcStatus(s) = status(TaskError::WrongState {
        op: "delete",
        id: "x".into(),
        state: "running",
    }) else {
        panic!("an RPC status");
    };
    assert_eq!(s.code(), Code::FAILED_PRECONDITION);
}
