//! Local accounts: a user or group given by name or numeric id, resolved through `/etc/passwd`
//! or `/etc/group`, for the options that hand files to a service's user or group (the rotator's
//! `key_group`, `issuer init --owner`). Only the local files are read (no NSS, so no LDAP): the
//! system users a host install creates with `useradd --system` live there.

use std::path::{Path, PathBuf};

/// The local user database.
pub const PASSWD_FILE: &str = "/etc/passwd";
/// The local group database.
pub const GROUP_FILE: &str = "/etc/group";

/// A user or group that cannot be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// The account database could not be read.
    #[error("cannot read {} to resolve {name:?}: {source}", path.display())]
    Read {
        /// The database file.
        path: PathBuf,
        /// The name being resolved.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No such user.
    #[error("no user named {name:?} in {}", path.display())]
    NoSuchUser {
        /// The name asked for.
        name: String,
        /// The database searched.
        path: PathBuf,
    },
    /// No such group.
    #[error("no group named {name:?} in {}", path.display())]
    NoSuchGroup {
        /// The name asked for.
        name: String,
        /// The database searched.
        path: PathBuf,
    },
}

/// The uid of a user name (from [`PASSWD_FILE`]) or of a numeric uid, which is taken as is.
/// Blocks.
pub fn user_id(name: &str) -> Result<u32, AccountError> {
    resolve(Path::new(PASSWD_FILE), name).and_then(|id| {
        id.ok_or_else(|| AccountError::NoSuchUser {
            name: name.to_string(),
            path: PASSWD_FILE.into(),
        })
    })
}

/// The gid of a group name (from [`GROUP_FILE`]) or of a numeric gid, which is taken as is.
/// Blocks.
pub fn group_id(name: &str) -> Result<u32, AccountError> {
    resolve(Path::new(GROUP_FILE), name).and_then(|id| {
        id.ok_or_else(|| AccountError::NoSuchGroup {
            name: name.to_string(),
            path: GROUP_FILE.into(),
        })
    })
}

/// A numeric id as is, else the id of `name` in the database at `path` (`None`: not there).
fn resolve(path: &Path, name: &str) -> Result<Option<u32>, AccountError> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(Some(id));
    }
    let text = std::fs::read_to_string(path).map_err(|source| AccountError::Read {
        path: path.to_path_buf(),
        name: name.to_string(),
        source,
    })?;
    Ok(id_in(&text, name))
}

/// The id of `name` in `/etc/passwd` or `/etc/group` text: both put it in the third field.
fn id_in(db: &str, name: &str) -> Option<u32> {
    db.lines().find_map(|line| {
        let mut fields = line.split(':');
        let entry = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (entry == name).then_some(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          # a comment line\n\
                          issuer:x:998:997::/nonexistent:/usr/sbin/nologin\n\
                          broken:x:notanumber:1::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nmesh-identity:x:996:mtls-proxy,rotator\n";

    #[test]
    fn finds_names_in_the_third_field_of_either_database() {
        assert_eq!(id_in(PASSWD, "issuer"), Some(998));
        assert_eq!(id_in(PASSWD, "root"), Some(0));
        assert_eq!(id_in(GROUP, "mesh-identity"), Some(996));
        // A member list is not a name, and a prefix is not a match.
        assert_eq!(id_in(GROUP, "rotator"), None);
        assert_eq!(id_in(PASSWD, "iss"), None);
        assert_eq!(id_in(PASSWD, "broken"), None);
        assert_eq!(id_in(PASSWD, "# a comment line"), None);
    }

    #[test]
    fn numeric_ids_are_taken_as_is_and_unknown_names_are_named_in_the_error() {
        assert_eq!(user_id("4242").unwrap(), 4242);
        assert_eq!(group_id("4243").unwrap(), 4243);
        assert_eq!(user_id("root").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        let e = user_id("no-such-user-here").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no user named \"no-such-user-here\" in /etc/passwd"
        );
        let e = group_id("no-such-group-here").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no group named \"no-such-group-here\" in /etc/group"
        );
    }

    #[test]
    fn an_unreadable_database_names_the_file_and_the_name() {
        let d = tempfile::tempdir().unwrap();
        let e = resolve(&d.path().join("passwd"), "issuer").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("passwd") && msg.contains("\"issuer\""),
            "{msg}"
        );
    }
}
