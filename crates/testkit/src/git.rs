//! Git and forge-webhook helpers for the pipeline tests: a bare repository (the "forge") with a work clone that
//! commits and pushes, and the push webhooks of GitHub, Gitea and GitLab, signed as those forges sign them.
//!
//! Git runs with `-c user.name -c user.email` and no dependence on the user's or system's configuration of
//! identity, default branch or signing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{send, Method, Resp};

const NAME: &str = "nonstop-test";
const EMAIL: &str = "test@nonstop.invalid";

/// Runs `git ARGS` (in `dir` when given), panicking with its output when it fails; returns its stdout.
fn git(dir: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    cmd.args(["-c", &format!("user.name={NAME}"), "-c", &format!("user.email={EMAIL}")]);
    cmd.args(["-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", "-c", "core.hooksPath=/dev/null"]);
    cmd.args(args);
    cmd.env("GIT_TERMINAL_PROMPT", "0").env("GIT_CONFIG_NOSYSTEM", "1");
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run git {args:?}: {e}"));
    assert!(
        out.status.success(),
        "git {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies the files of `from` into `to`, recursively, leaving out build output (`dist`, `__pycache__`, `.git`).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if matches!(name.to_str(), Some("dist" | "__pycache__" | ".git")) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        }
    }
}

/// A bare repository (what a pipeline's `repo` names) and a work clone that commits and pushes to its `main`.
pub struct Repo {
    bare: PathBuf,
    work: PathBuf,
}

impl Repo {
    /// `dir/repo.git` (bare) and `dir/work` (its clone), the first commit holding the files of `files_from`,
    /// pushed to `main`.
    pub fn new(dir: &Path, files_from: &Path) -> Repo {
        let (bare, work) = (dir.join("repo.git"), dir.join("work"));
        git(None, &["init", "--quiet", "--bare", "-b", "main", bare.to_str().unwrap()]);
        git(None, &["clone", "--quiet", bare.to_str().unwrap(), work.to_str().unwrap()]);
        // The clone of an empty repository is on an unborn branch: make it main, whatever git's default.
        git(Some(&work), &["symbolic-ref", "HEAD", "refs/heads/main"]);
        copy_tree(files_from, &work);
        let repo = Repo { bare, work };
        repo.commit_all("the example app");
        repo
    }

    /// The bare repository's path, as a pipeline's `repo` (and a push's clone URL).
    pub fn url(&self) -> String {
        self.bare.display().to_string()
    }

    /// The work clone.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// Writes `edits` (path relative to the repository, content), commits them with `msg`, pushes to `main`;
    /// returns the commit's 40-hex id.
    pub fn commit(&self, msg: &str, edits: &[(&str, &str)]) -> String {
        for (path, content) in edits {
            let file = self.work.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(&file, content).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        }
        self.commit_all(msg)
    }

    fn commit_all(&self, msg: &str) -> String {
        git(Some(&self.work), &["add", "-A"]);
        git(Some(&self.work), &["commit", "--quiet", "--allow-empty", "-m", msg]);
        git(Some(&self.work), &["push", "--quiet", "origin", "HEAD:refs/heads/main"]);
        self.head()
    }

    /// The commit `main` points at in the bare repository.
    pub fn head(&self) -> String {
        let id = git(None, &["--git-dir", self.bare.to_str().unwrap(), "rev-parse", "refs/heads/main"]);
        let id = id.trim().to_string();
        assert!(id.len() == 40 && id.bytes().all(|b| b.is_ascii_hexdigit()), "not a commit id: {id:?}");
        id
    }

    /// The content of `path` in the work clone (the last commit's, when nothing is uncommitted).
    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.work.join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 of `data` with `key`, in lower-case hex (what GitHub and Gitea send).
pub fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex(ring::hmac::sign(&key, data).as_ref())
}

/// A push's body as GitHub and Gitea send it (the fields a pipeline reads).
fn push_body(branch: &str, commit: &str, repo_url: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0".repeat(40),
        "after": commit,
        "repository": { "name": "web", "full_name": "shop/web", "clone_url": repo_url },
        "head_commit": { "id": commit, "message": "a commit" },
        "pusher": { "name": NAME, "email": EMAIL },
    })
    .to_string()
    .into_bytes()
}

type Headers = Vec<(String, String)>;

fn headers(pairs: &[(&str, String)]) -> Headers {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// GitHub's push webhook: `X-GitHub-Event: push`, `X-GitHub-Delivery`, and
/// `X-Hub-Signature-256: sha256=HEX(HMAC-SHA256(secret, body))`.
pub fn github_push(secret: &[u8], delivery: &str, branch: &str, commit: &str, repo_url: &str) -> (Headers, Vec<u8>) {
    let body = push_body(branch, commit, repo_url);
    let h = headers(&[
        ("content-type", "application/json".into()),
        ("x-github-event", "push".into()),
        ("x-github-delivery", delivery.into()),
        ("x-hub-signature-256", format!("sha256={}", hmac_sha256_hex(secret, &body))),
        ("user-agent", "GitHub-Hookshot/nonstop-test".into()),
    ]);
    (h, body)
}

/// Gitea's push webhook: `X-Gitea-Event: push`, `X-Gitea-Delivery`, and `X-Gitea-Signature: HEX` (no prefix).
pub fn gitea_push(secret: &[u8], delivery: &str, branch: &str, commit: &str, repo_url: &str) -> (Headers, Vec<u8>) {
    let body = push_body(branch, commit, repo_url);
    let h = headers(&[
        ("content-type", "application/json".into()),
        ("x-gitea-event", "push".into()),
        ("x-gitea-delivery", delivery.into()),
        ("x-gitea-signature", hmac_sha256_hex(secret, &body)),
    ]);
    (h, body)
}

/// GitLab's push webhook: `X-Gitlab-Event: Push Hook`, `X-Gitlab-Event-UUID`, and the secret itself as
/// `X-Gitlab-Token`; its body names the commit as `after` and `checkout_sha`.
pub fn gitlab_push(secret: &str, delivery: &str, branch: &str, commit: &str, repo_url: &str) -> (Headers, Vec<u8>) {
    let body = serde_json::json!({
        "object_kind": "push",
        "event_name": "push",
        "ref": format!("refs/heads/{branch}"),
        "before": "0".repeat(40),
        "after": commit,
        "checkout_sha": commit,
        "project": { "name": "web", "git_http_url": repo_url },
        "repository": { "name": "web", "git_http_url": repo_url },
        "commits": [{ "id": commit, "message": "a commit" }],
    })
    .to_string()
    .into_bytes();
    let h = headers(&[
        ("content-type", "application/json".into()),
        ("x-gitlab-event", "Push Hook".into()),
        ("x-gitlab-event-uuid", delivery.into()),
        ("x-gitlab-token", secret.into()),
    ]);
    (h, body)
}

/// POSTs `body` as it is, with `headers`, to `path` on `addr` (the admin listener's `/hooks/NAME`, say).
pub async fn post_raw(addr: SocketAddr, path: &str, headers: &[(String, String)], body: &[u8]) -> Resp {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    send(addr, Method::POST, path, &h, body.to_vec()).await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231_test_case_2() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn github_signs_the_exact_body() {
        let (h, body) = github_push(b"s3cret", "d-1", "main", &"a".repeat(40), "/tmp/repo.git");
        let sig = &h.iter().find(|(k, _)| k == "x-hub-signature-256").unwrap().1;
        assert_eq!(sig, &format!("sha256={}", hmac_sha256_hex(b"s3cret", &body)));
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["ref"], "refs/heads/main");
        assert_eq!(doc["after"], "a".repeat(40));
        assert_eq!(doc["head_commit"]["id"], "a".repeat(40));
        assert_eq!(doc["repository"]["clone_url"], "/tmp/repo.git");
        let (h, body) = gitea_push(b"s3cret", "d-2", "main", &"b".repeat(40), "/tmp/repo.git");
        let sig = &h.iter().find(|(k, _)| k == "x-gitea-signature").unwrap().1;
        assert_eq!(sig, &hmac_sha256_hex(b"s3cret", &body));
        let (h, _) = gitlab_push("s3cret", "d-3", "main", &"c".repeat(40), "/tmp/repo.git");
        assert!(h.contains(&("x-gitlab-token".to_string(), "s3cret".to_string())));
    }

    #[test]
    fn a_repo_commits_and_pushes_to_main() {
        let dir = crate::TempDir::new("git-repo");
        let files = dir.path().join("files");
        std::fs::create_dir_all(files.join("sub")).unwrap();
        std::fs::write(files.join("a.txt"), "one\n").unwrap();
        std::fs::write(files.join("sub/b.txt"), "two\n").unwrap();
        std::fs::create_dir_all(files.join("dist")).unwrap();
        std::fs::write(files.join("dist/left-out"), "x").unwrap();
        let repo = Repo::new(dir.path(), &files);
        let first = repo.head();
        let second = repo.commit("change a", &[("a.txt", "three\n"), ("new/c.txt", "four\n")]);
        assert_ne!(first, second);
        assert_eq!(repo.head(), second);
        // A fresh clone of the bare repository has the pushed content, without the build output.
        let check = dir.path().join("check");
        git(None, &["clone", "--quiet", "-b", "main", &repo.url(), check.to_str().unwrap()]);
        assert_eq!(std::fs::read_to_string(check.join("a.txt")).unwrap(), "three\n");
        assert_eq!(std::fs::read_to_string(check.join("sub/b.txt")).unwrap(), "two\n");
        assert_eq!(std::fs::read_to_string(check.join("new/c.txt")).unwrap(), "four\n");
        assert!(!check.join("dist").exists());
        let log = git(Some(&check), &["log", "--format=%an <%ae> %s"]);
        assert_eq!(log.lines().next(), Some("nonstop-test <test@nonstop.invalid> change a"));
        assert_eq!(log.lines().count(), 2);
    }
}
