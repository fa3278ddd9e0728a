//! OCI seccomp profile -> classic BPF, with the pure-Rust `seccompiler` (the agent links
//! statically, so libseccomp is not an option).
//!
//! seccompiler filters have one "match" and one "mismatch" action, while OCI rules each
//! carry their own action. The profile is therefore compiled into several filters that
//! the kernel evaluates together (it applies the most restrictive result):
//! - the base filter: every rule (with its argument conditions) -> allow, else the
//!   profile's default action;
//! - one filter per distinct non-allow rule action A: rules with action A -> A, else allow.
//!
//! Syscall names unknown on this architecture are skipped, as libseccomp does.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{Value, json};

/// Errors compiling or installing a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp action {action:?} is not supported{where_}")]
    UnsupportedAction {
        action: LinuxSeccompAction,
        where_: String,
    },
    #[error("seccomp rule for {syscall}: argument index {index} is out of range 0..6")]
    ArgIndex { syscall: String, index: usize },
    #[error("compiling seccomp filter")]
    Compile(#[source] seccompiler::Error),
    #[error("installing seccomp filter")]
    Install(#[source] std::io::Error),
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

fn action_json(
    action: LinuxSeccompAction,
    errno: Option<u32>,
    where_: &str,
) -> Result<Value, SeccompError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => json!("allow"),
        LinuxSeccompAction::ScmpActErrno => json!({ "errno": errno.unwrap_or(libc::EPERM as u32) }),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            json!("kill_thread")
        }
        LinuxSeccompAction::ScmpActKillProcess => json!("kill_process"),
        LinuxSeccompAction::ScmpActTrap => json!("trap"),
        LinuxSeccompAction::ScmpActLog => json!("log"),
        LinuxSeccompAction::ScmpActTrace => json!({ "trace": errno.unwrap_or(libc::EPERM as u32) }),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::UnsupportedAction {
                action,
                where_: where_.to_owned(),
            });
        }
    })
}

fn known_syscall(name: &str) -> bool {
    let probe = json!({ "p": { "mismatch_action": "allow", "match_action": "log",
        "filter": [ { "syscall": name } ] } });
    seccompiler::compile_from_json(probe.to_string().as_bytes(), ARCH).is_ok()
}

fn rule_json(name: &str, rule: &LinuxSyscall) -> Result<Value, SeccompError> {
    let mut args = Vec::new();
    for a in rule.args().iter().flatten() {
        if a.index() >= 6 {
            return Err(SeccompError::ArgIndex {
                syscall: name.to_owned(),
                index: a.index(),
            });
        }
        let (op, val) = match a.op() {
            LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value()),
            LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value()),
            LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value()),
            LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value()),
            LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value()),
            LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value()),
            LinuxSeccompOperator::ScmpCmpMaskedEq => (
                json!({ "masked_eq": a.value() }),
                a.value_two().unwrap_or(0),
            ),
        };
        args.push(json!({ "index": a.index(), "type": "qword", "op": op, "val": val }));
    }
    Ok(if args.is_empty() {
        json!({ "syscall": name })
    } else {
        json!({ "syscall": name, "args": args })
    })
}

/// Compiles the profile into the BPF programs to install (in order).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    let default = action_json(
        profile.default_action(),
        profile.default_errno_ret(),
        " as defaultAction",
    )?;
    let mut base_rules = Vec::new();
    // (action json, rules) for non-allow actions, in first-seen order.
    let mut by_action: Vec<(Value, Vec<Value>)> = Vec::new();
    for rule in profile.syscalls().iter().flatten() {
        let action = action_json(
            rule.action(),
            rule.errno_ret(),
            &format!(" for {:?}", rule.names()),
        )?;
        for name in rule.names() {
            if !known_syscall(name) {
                tracing::debug!(syscall = %name, "seccomp: unknown syscall skipped");
                continue;
            }
            let r = rule_json(name, rule)?;
            base_rules.push(r.clone());
            if action != json!("allow") {
                match by_action.iter_mut().find(|(a, _)| *a == action) {
                    Some((_, rules)) => rules.push(r),
                    None => by_action.push((action.clone(), vec![r])),
                }
            }
        }
    }
    let mut filters = serde_json::Map::new();
    let mut order = Vec::new();
    if default != json!("allow") {
        filters.insert(
            "base".into(),
            json!({ "mismatch_action": default, "match_action": "allow", "filter": base_rules }),
        );
        order.push("base".to_owned());
    }
    for (i, (action, rules)) in by_action.into_iter().enumerate() {
        let name = format!("action{i}");
        filters.insert(
            name.clone(),
            json!({ "mismatch_action": "allow", "match_action": action, "filter": rules }),
        );
        order.push(name);
    }
    let text = Value::Object(filters).to_string();
    let mut map =
        seccompiler::compile_from_json(text.as_bytes(), ARCH).map_err(SeccompError::Compile)?;
    Ok(order.into_iter().filter_map(|n| map.remove(&n)).collect())
}

/// Installs the programs on the calling thread (no_new_privs or CAP_SYS_ADMIN required).
/// Not seccompiler's `apply_filter`: that one always sets no_new_privs, which must stay as
/// the process spec says (a process without noNewPrivileges may exec setuid programs).
pub fn install(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        let insns: Vec<libc::sock_filter> = p
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        crate::sys::install_seccomp_filter(&insns).map_err(SeccompError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn compiles_default_errno_with_allow_list_and_errno_rule() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","no_such_syscall_xyz"],"action":"SCMP_ACT_ALLOW"},
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let progs = compile(&p).unwrap();
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn allow_default_needs_only_action_filters() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn notify_is_refused() {
        let p = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(matches!(
            compile(&p),
            Err(SeccompError::UnsupportedAction { .. })
        ));
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":9,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert!(matches!(compile(&p), Err(SeccompError::ArgIndex { .. })));
    }
}
