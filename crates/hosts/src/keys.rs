//! nonstop's SSH key pair: an ed25519 key made by `nonstop keys init` under `state_dir/ssh/`, the private key in
//! OpenSSH's format (0600, in a 0700 directory), never overwritten unless asked to.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;

/// The private key's file name in `state_dir/ssh/`; the public key is beside it with `.pub`.
pub const IDENTITY_FILE: &str = "id_ed25519";

/// Why a key pair could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("a key pair is already at {} (use --force to replace it; every host would need the new public key)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot encode the key: {0}")]
    Encode(String),
}

/// A made key pair, as written.
#[derive(Debug, Clone)]
pub struct Made {
    pub private_path: PathBuf,
    /// The `authorized_keys` line: `ssh-ed25519 AAAA... COMMENT`.
    pub public_line: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeysError + '_ {
    move |source| KeysError::Io { path: path.to_path_buf(), source }
}

/// A new ed25519 key: its private key in OpenSSH's format and its `authorized_keys` line, both with `comment`.
pub fn generate(comment: &str) -> Result<(String, String), KeysError> {
    let mut seed = [0u8; 32];
    let urandom = Path::new("/dev/urandom");
    std::io::Read::read_exact(&mut std::fs::File::open(urandom).map_err(io(urandom))?, &mut seed)
        .map_err(io(urandom))?;
    let pair = Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::new(KeypairData::Ed25519(pair), comment).map_err(|e| KeysError::Encode(e.to_string()))?;
    let private = key.to_openssh(LineEnding::LF).map_err(|e| KeysError::Encode(e.to_string()))?;
    let public = key.public_key().to_openssh().map_err(|e| KeysError::Encode(e.to_string()))?;
    Ok((private.to_string(), public))
}

/// The comment of nonstop's key: `nonstop@HOSTNAME`.
pub fn default_comment() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("nonstop@{}", if host.is_empty() { "localhost" } else { host })
}

/// Makes the key pair in `dir` (created 0700): `id_ed25519` (0600) and `id_ed25519.pub`. An existing private key
/// is an error unless `force`.
pub fn init(dir: &Path, force: bool, comment: &str) -> Result<Made, KeysError> {
    let private_path = dir.join(IDENTITY_FILE);
    let public_path = dir.join(format!("{IDENTITY_FILE}.pub"));
    if !force && std::fs::symlink_metadata(&private_path).is_ok() {
        return Err(KeysError::Exists(private_path));
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let (private, public) = generate(comment)?;
    // Written beside and renamed, so that a crash leaves the old key or the new one, never half of one.
    let tmp = dir.join(format!(".{IDENTITY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(private.as_bytes()).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    std::fs::write(&public_path, format!("{public}\n")).map_err(io(&public_path))?;
    std::fs::rename(&tmp, &private_path).map_err(io(&private_path))?;
    Ok(Made { private_path, public_line: public })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_reads_back_and_its_public_line_is_one_authorized_keys_line() {
        let (private, public) = generate("nonstop@test").unwrap();
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"), "{private}");
        let key = PrivateKey::from_openssh(&private).unwrap();
        assert_eq!(key.public_key().to_openssh().unwrap(), public);
        assert!(public.starts_with("ssh-ed25519 AAAA") && public.ends_with(" nonstop@test"), "{public}");
        assert!(!public.contains('\n'));
        assert_ne!(generate("x").unwrap().0, generate("x").unwrap().0, "two keys are different");
    }
}
