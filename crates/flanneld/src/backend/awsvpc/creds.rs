//! The AWS default credential chain, as far as a node needs it: the environment, the shared
//! credentials file, then the instance profile (through IMDS). The first source that has a key
//! wins; only the source's name is ever logged.

use std::path::PathBuf;

use crate::backend::cloud::{CloudError, Secret};

use super::imds::Imds;
use super::sigv4::Credentials;

/// Credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`).
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Option<Credentials> {
    let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
    let id = non_empty("AWS_ACCESS_KEY_ID")?;
    let secret = non_empty("AWS_SECRET_ACCESS_KEY")?;
    Some(Credentials {
        access_key_id: id,
        secret_access_key: Secret::new(secret),
        session_token: non_empty("AWS_SESSION_TOKEN").map(Secret::new),
    })
}

/// The shared credentials file: `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`.
pub fn shared_file_path(get: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = get("AWS_SHARED_CREDENTIALS_FILE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    get("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".aws").join("credentials"))
}

/// The profile to read: `AWS_PROFILE`, else `default`.
pub fn profile_name(get: impl Fn(&str) -> Option<String>) -> String {
    get("AWS_PROFILE")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// The credentials of `[profile]` in a shared credentials file's text (INI: `key = value`,
/// `#`/`;` comments); `None` if the profile is absent or has no key pair.
pub fn from_shared_file(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    Some(Credentials {
        access_key_id: id.filter(|v| !v.is_empty())?,
        secret_access_key: Secret::new(secret.filter(|v| !v.is_empty())?),
        session_token: token.filter(|v| !v.is_empty()).map(Secret::new),
    })
}

/// Walks the chain; the error says where credentials were looked for.
pub async fn resolve(imds: &Imds) -> Result<Credentials, CloudError> {
    let env = |k: &str| std::env::var(k).ok();
    if let Some(c) = from_env(env) {
        tracing::info!("aws-vpc: using credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY");
        return Ok(c);
    }
    let profile = profile_name(env);
    let file = shared_file_path(env);
    if let Some(path) = &file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Some(c) = from_shared_file(&text, &profile) {
                    tracing::info!(
                        "aws-vpc: using credentials of profile {profile:?} from {}",
                        path.display()
                    );
                    return Ok(c);
                }
                tracing::info!(
                    "aws-vpc: {} has no key pair for profile {profile:?}",
                    path.display()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("aws-vpc: cannot read {}: {e}", path.display()),
        }
    }
    match imds.role_credentials().await? {
        Some(c) => {
            tracing::info!(
                "aws-vpc: using the instance profile's role credentials from {}",
                imds.endpoint()
            );
            Ok(c)
        }
        None => Err(CloudError::Config(format!(
            "no AWS credentials: none in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, none for profile {profile:?} in {}, and the instance has no instance profile role",
            file.map(|p| p.display().to_string())
                .unwrap_or_else(|| "the shared credentials file (HOME unset)".into())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment() {
        let c = from_env(vars(&[
            ("AWS_ACCESS_KEY_ID", "AKIA1"),
            ("AWS_SECRET_ACCESS_KEY", "sec"),
            ("AWS_SESSION_TOKEN", "tok"),
        ]))
        .unwrap();
        assert_eq!(c.access_key_id, "AKIA1");
        assert_eq!(c.session_token.unwrap().expose(), "tok");
        assert!(from_env(vars(&[("AWS_ACCESS_KEY_ID", "AKIA1")])).is_none());
        assert!(from_env(vars(&[
            ("AWS_ACCESS_KEY_ID", "AKIA1"),
            ("AWS_SECRET_ACCESS_KEY", "")
        ]))
        .is_none());
    }

    #[test]
    fn shared_file() {
        let text = "# comment\n[default]\naws_access_key_id = AKIADEF\naws_secret_access_key=defsecret\n\n\
                    [node]\n; another comment\nAWS_ACCESS_KEY_ID = AKIANODE\naws_secret_access_key = nodesecret\naws_session_token = t\nregion = x\n\
                    [empty]\naws_access_key_id = AKIAX\n";
        let d = from_shared_file(text, "default").unwrap();
        assert_eq!(d.access_key_id, "AKIADEF");
        assert_eq!(d.secret_access_key.expose(), "defsecret");
        assert!(d.session_token.is_none());
        let n = from_shared_file(text, "node").unwrap();
        assert_eq!(n.access_key_id, "AKIANODE");
        assert_eq!(n.session_token.unwrap().expose(), "t");
        assert!(from_shared_file(text, "empty").is_none());
        assert!(from_shared_file(text, "missing").is_none());
    }

    #[test]
    fn file_and_profile_names() {
        assert_eq!(
            shared_file_path(vars(&[("HOME", "/root")])),
            Some(PathBuf::from("/root/.aws/credentials"))
        );
        assert_eq!(
            shared_file_path(vars(&[
                ("HOME", "/root"),
                ("AWS_SHARED_CREDENTIALS_FILE", "/c")
            ])),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(profile_name(vars(&[])), "default");
        assert_eq!(profile_name(vars(&[("AWS_PROFILE", "node")])), "node");
    }
}
