//! Stamps the commit the binary was built from into `TOKEN_PROXY_COMMIT`, for `--version` and
//! `token_proxy_build_info`: `TOKEN_PROXY_BUILD_COMMIT` when set (the Dockerfile passes it, having
//! no `.git`), else `git rev-parse --short=12 HEAD`, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TOKEN_PROXY_BUILD_COMMIT");
    let from_env = std::env::var("TOKEN_PROXY_BUILD_COMMIT").ok().filter(|c| !c.trim().is_empty());
    let commit = from_env.or_else(git_commit).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TOKEN_PROXY_COMMIT={}", commit.trim());
}

/// HEAD's short hash; also asks Cargo to build again when HEAD moves (a commit, a checkout).
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let output = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        String::from_utf8(output.stdout).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // HEAD names a branch whose ref file changes on commit; both may live outside this crate
    // (a worktree keeps HEAD apart from the shared refs). A packed ref is not watched.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["symbolic-ref", "-q", "HEAD"]).and_then(|branch| git(&["rev-parse", "--git-path", &branch])),
    ]
    .into_iter()
    .flatten()
    // A path that does not exist would make Cargo run this script on every build.
    .filter(|path| std::path::Path::new(path).exists())
    {
        println!("cargo:rerun-if-changed={path}");
    }
    Some(commit)
}
