//! runc's `exec` options about who the new process is, applied to its OCI process
//! object: `--user UID[:GID]`, `--additional-gids`, `--cap`, `--no-new-privs`, and
//! `--preserve-fds`, which a VM cannot honour.
//!
//! Users are numeric only: a name would have to be looked up in the container's
//! `/etc/passwd`, which lives in the guest's view of the rootfs; a name is refused with
//! that reason rather than guessed on the host.

use serde_json::{Value, json};

/// Errors of the identity options.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `--user` is not `UID[:GID]`.
    #[error(
        "--user {given:?}: give a numeric UID[:GID] (names are resolved in the guest, which the host cannot read)"
    )]
    User {
        /// As given.
        given: String,
    },
    /// `--cap` names no capability.
    #[error("--cap {given:?}: not a Linux capability (e.g. CAP_NET_ADMIN or NET_ADMIN)")]
    Capability {
        /// As given.
        given: String,
    },
    /// `--preserve-fds` asked to pass descriptors.
    #[error(
        "--preserve-fds {count}: descriptors of this host cannot be passed to a process in a VM"
    )]
    PreserveFds {
        /// How many.
        count: u32,
    },
}

/// Who an exec'd process is, beyond the container's own process.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `--user UID[:GID]`.
    pub user: Option<String>,
    /// `--additional-gids`.
    pub additional_gids: Vec<u32>,
    /// `--cap` (with or without the `CAP_` prefix).
    pub caps: Vec<String>,
    /// `--no-new-privs`.
    pub no_new_privileges: bool,
    /// `--preserve-fds`.
    pub preserve_fds: u32,
}

fn parse_user(given: &str) -> Result<(u32, Option<u32>), IdentityError> {
    let bad = || IdentityError::User {
        given: given.to_owned(),
    };
    let (uid, gid) = match given.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (given, None),
    };
    let uid = uid.parse().map_err(|_| bad())?;
    let gid = gid.map(|g| g.parse().map_err(|_| bad())).transpose()?;
    Ok((uid, gid))
}

fn capability(given: &str) -> Result<String, IdentityError> {
    let upper = given.to_ascii_uppercase();
    let name = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    serde_json::from_value::<oci_spec::runtime::Capability>(json!(name))
        .map(|_| name)
        .map_err(|_| IdentityError::Capability {
            given: given.to_owned(),
        })
}

/// Applies `id` to the OCI `process` object (the container's own, as `exec` builds it):
/// the user (a UID alone keeps the process's GID), added group ids, capabilities added
/// to the bounding, effective and permitted sets, `noNewPrivileges`.
pub fn apply(process: &mut Value, id: &Identity) -> Result<(), IdentityError> {
    if id.preserve_fds > 0 {
        return Err(IdentityError::PreserveFds {
            count: id.preserve_fds,
        });
    }
    if !process.is_object() {
        *process = json!({});
    }
    if let Some(u) = &id.user {
        let (uid, gid) = parse_user(u)?;
        if !process["user"].is_object() {
            process["user"] = json!({"uid": 0, "gid": 0});
        }
        process["user"]["uid"] = json!(uid);
        if let Some(gid) = gid {
            process["user"]["gid"] = json!(gid);
        }
    }
    if !id.additional_gids.is_empty() {
        if !process["user"].is_object() {
            process["user"] = json!({"uid": 0, "gid": 0});
        }
        let mut gids: Vec<u32> =
            serde_json::from_value(process["user"]["additionalGids"].clone()).unwrap_or_default();
        for g in &id.additional_gids {
            if !gids.contains(g) {
                gids.push(*g);
            }
        }
        process["user"]["additionalGids"] = json!(gids);
    }
    let caps = id
        .caps
        .iter()
        .map(|c| capability(c))
        .collect::<Result<Vec<_>, _>>()?;
    if !caps.is_empty() {
        if !process["capabilities"].is_object() {
            process["capabilities"] = json!({});
        }
        for set in ["bounding", "effective", "permitted"] {
            let mut have: Vec<String> =
                serde_json::from_value(process["capabilities"][set].clone()).unwrap_or_default();
            for c in &caps {
                if !have.contains(c) {
                    have.push(c.clone());
                }
            }
            process["capabilities"][set] = json!(have);
        }
    }
    if id.no_new_privileges {
        process["noNewPrivileges"] = json!(true);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_options_edit_the_process_as_runcs_do() {
        let mut p = json!({
            "args": ["id"],
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]},
        });
        apply(
            &mut p,
            &Identity {
                user: Some("1000:1001".into()),
                additional_gids: vec![5, 5, 7],
                caps: vec!["net_admin".into(), "CAP_CHOWN".into()],
                no_new_privileges: true,
                preserve_fds: 0,
            },
        )
        .unwrap();
        assert_eq!(
            p["user"],
            json!({"uid": 1000, "gid": 1001, "additionalGids": [5, 7]})
        );
        assert_eq!(
            p["capabilities"]["bounding"],
            json!(["CAP_CHOWN", "CAP_NET_ADMIN"])
        );
        assert_eq!(
            p["capabilities"]["permitted"],
            json!(["CAP_NET_ADMIN", "CAP_CHOWN"])
        );
        assert_eq!(p["noNewPrivileges"], true);
        // a UID alone keeps the GID
        let mut p = json!({"user": {"uid": 0, "gid": 42}});
        apply(
            &mut p,
            &Identity {
                user: Some("7".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p["user"], json!({"uid": 7, "gid": 42}));
        // nothing asked: nothing changed
        let before = json!({"args": ["x"]});
        let mut p = before.clone();
        apply(&mut p, &Identity::default()).unwrap();
        assert_eq!(p, before);
    }

    #[test]
    fn bad_identity_options_are_refused_by_name() {
        let mut p = json!({});
        let user = |u: &str| Identity {
            user: Some(u.into()),
            ..Default::default()
        };
        for bad in ["nobody", "1000:staff", "", "-1"] {
            let err = apply(&mut p, &user(bad)).unwrap_err();
            assert!(err.to_string().contains("numeric UID"), "{bad}: {err}");
        }
        let err = apply(
            &mut p,
            &Identity {
                caps: vec!["CAP_FLY".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("CAP_FLY"), "{err}");
        let err = apply(
            &mut p,
            &Identity {
                preserve_fds: 2,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--preserve-fds 2"), "{err}");
        assert_eq!(p, json!({}));
    }
}
