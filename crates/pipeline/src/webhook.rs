//! Push webhooks from GitHub, Gitea and GitLab: the signature checked in constant time over the raw body, the
//! delivery id, and the pushed branch and commit. Pure: headers and body in, a verdict out.

use ring::hmac;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    GitHub,
    Gitea,
    GitLab,
}

impl Forge {
    pub fn as_str(self) -> &'static str {
        match self {
            Forge::GitHub => "github",
            Forge::Gitea => "gitea",
            Forge::GitLab => "gitlab",
        }
    }
}

/// Why a hook is refused or ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// 401: nothing proves the sender knows the secret.
    #[error("{0}")]
    Unauthenticated(String),
    /// 400: signed, but not a push payload nonstop can read.
    #[error("{0}")]
    BadPayload(String),
}

/// A verified hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub forge: Forge,
    pub delivery: Option<String>,
    /// `push`, or the other event's name (answered 202 and ignored).
    pub event: String,
    pub push: Option<Push>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// `refs/heads/main`.
    pub git_ref: String,
    /// The branch, when the ref is one.
    pub branch: Option<String>,
    /// The commit pushed; `None` for a deleted branch.
    pub commit: Option<String>,
}

/// Longest delivery id kept.
const DELIVERY_CHARS_MAX: usize = 200;

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Checks the hook's signature against `secret` and reads it. Headers are (name, value) pairs, any case.
pub fn verify(headers: &[(String, String)], body: &[u8], secret: &[u8]) -> Result<Hook, HookError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let forge = if let Some(token) = header(headers, "x-gitlab-token") {
        // GitLab sends the secret itself: compared in constant time, as the HMACs of both under one key.
        let expected = hmac::sign(&key, secret);
        hmac::verify(&key, token.as_bytes(), expected.as_ref())
            .map_err(|_| HookError::Unauthenticated("X-Gitlab-Token does not match the webhook secret".into()))?;
        Forge::GitLab
    } else if let Some(sig) = header(headers, "x-hub-signature-256") {
        let hex = sig.strip_prefix("sha256=").ok_or_else(|| {
            HookError::Unauthenticated("X-Hub-Signature-256 must be sha256=HEX (HMAC-SHA256 of the body)".into())
        })?;
        let tag = unhex(hex).ok_or_else(|| HookError::Unauthenticated("X-Hub-Signature-256 is not hex".into()))?;
        hmac::verify(&key, body, &tag).map_err(|_| {
            HookError::Unauthenticated("X-Hub-Signature-256 does not match the body and the webhook secret".into())
        })?;
        if header(headers, "x-gitea-event").is_some() {
            Forge::Gitea
        } else {
            Forge::GitHub
        }
    } else if let Some(sig) = header(headers, "x-gitea-signature") {
        let tag = unhex(sig).ok_or_else(|| HookError::Unauthenticated("X-Gitea-Signature is not hex".into()))?;
        hmac::verify(&key, body, &tag).map_err(|_| {
            HookError::Unauthenticated("X-Gitea-Signature does not match the body and the webhook secret".into())
        })?;
        Forge::Gitea
    } else {
        return Err(HookError::Unauthenticated(
            "no signature: expected X-Hub-Signature-256 (GitHub), X-Gitea-Signature (Gitea) or X-Gitlab-Token (GitLab)"
                .into(),
        ));
    };
    let (event_header, delivery_header) = match forge {
        Forge::GitHub => ("x-github-event", "x-github-delivery"),
        Forge::Gitea => ("x-gitea-event", "x-gitea-delivery"),
        Forge::GitLab => ("x-gitlab-event", "x-gitlab-event-uuid"),
    };
    let event = header(headers, event_header).unwrap_or("push").trim().to_string();
    let delivery = header(headers, delivery_header)
        .or_else(|| header(headers, "idempotency-key"))
        .map(|d| d.trim().chars().take(DELIVERY_CHARS_MAX).collect::<String>())
        .filter(|d| !d.is_empty());
    let is_push = matches!(event.as_str(), "push" | "Push Hook");
    let push = if is_push { Some(parse_push(body)?) } else { None };
    Ok(Hook { forge, delivery, event, push })
}

/// The ref and commit of a push payload (the three forges agree on `ref` and `after`).
fn parse_push(body: &[u8]) -> Result<Push, HookError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| HookError::BadPayload(format!("the push payload is not JSON: {e}")))?;
    let git_ref =
        v["ref"].as_str().ok_or_else(|| HookError::BadPayload("the push payload has no \"ref\"".into()))?.to_string();
    let commit = v["after"]
        .as_str()
        .or_else(|| v["checkout_sha"].as_str())
        .filter(|c| c.len() >= 7 && c.bytes().all(|b| b.is_ascii_hexdigit()) && c.bytes().any(|b| b != b'0'))
        .map(str::to_string);
    let branch = git_ref.strip_prefix("refs/heads/").map(str::to_string);
    Ok(Push { git_ref, branch, commit })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn sign(secret: &[u8], body: &[u8]) -> String {
        hex(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), body).as_ref())
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const BODY: &[u8] = br#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567"}"#;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_github_push_is_verified_and_read() {
        let sig = format!("sha256={}", sign(b"s3cret", BODY));
        let hook = verify(
            &h(&[("X-Hub-Signature-256", &sig), ("X-GitHub-Event", "push"), ("X-GitHub-Delivery", "d-1")]),
            BODY,
            b"s3cret",
        )
        .unwrap();
        assert_eq!(hook.forge, Forge::GitHub);
        assert_eq!(hook.delivery.as_deref(), Some("d-1"));
        let push = hook.push.unwrap();
        assert_eq!(push.branch.as_deref(), Some("main"));
        assert_eq!(push.commit.as_deref(), Some("0123456789abcdef0123456789abcdef01234567"));
    }

    #[test]
    fn gitea_and_gitlab_are_verified() {
        let hook = verify(
            &h(&[("x-gitea-signature", &sign(b"k", BODY)), ("x-gitea-event", "push"), ("x-gitea-delivery", "g")]),
            BODY,
            b"k",
        )
        .unwrap();
        assert_eq!((hook.forge, hook.delivery.as_deref()), (Forge::Gitea, Some("g")));
        let hook = verify(
            &h(&[("X-Gitlab-Token", "k"), ("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Event-UUID", "u")]),
            BODY,
            b"k",
        )
        .unwrap();
        assert_eq!((hook.forge, hook.delivery.as_deref()), (Forge::GitLab, Some("u")));
        assert!(hook.push.is_some());
    }

    #[test]
    fn a_wrong_missing_or_malformed_signature_is_refused() {
        let wrong = format!("sha256={}", sign(b"other", BODY));
        for headers in [
            h(&[("X-Hub-Signature-256", &wrong)]),
            h(&[("X-Hub-Signature-256", "sha1=abcd")]),
            h(&[("X-Hub-Signature-256", "sha256=zz")]),
            h(&[("X-Gitea-Signature", &sign(b"other", BODY))]),
            h(&[("X-Gitlab-Token", "kk")]),
            h(&[("X-GitHub-Event", "push")]),
        ] {
            assert!(matches!(verify(&headers, BODY, b"k"), Err(HookError::Unauthenticated(_))), "{headers:?}");
        }
        // A body changed after signing.
        let sig = format!("sha256={}", sign(b"k", BODY));
        let mut changed = BODY.to_vec();
        changed[10] ^= 1;
        assert!(verify(&h(&[("X-Hub-Signature-256", &sig)]), &changed, b"k").is_err());
    }

    #[test]
    fn other_events_are_read_but_carry_no_push() {
        let body = br#"{"zen":"hi"}"#;
        let sig = format!("sha256={}", sign(b"k", body));
        let hook = verify(&h(&[("X-Hub-Signature-256", &sig), ("X-GitHub-Event", "ping")]), body, b"k").unwrap();
        assert_eq!((hook.event.as_str(), hook.push), ("ping", None));
    }

    #[test]
    fn a_deleted_branch_has_no_commit() {
        let body = br#"{"ref":"refs/heads/gone","after":"0000000000000000000000000000000000000000"}"#;
        let sig = format!("sha256={}", sign(b"k", body));
        let push = verify(&h(&[("X-Hub-Signature-256", &sig)]), body, b"k").unwrap().push.unwrap();
        assert_eq!((push.branch.as_deref(), push.commit), (Some("gone"), None));
    }
}
