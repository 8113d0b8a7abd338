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
    // HEAD names a branch whose ref moves on commit; both may live outside this crate (a
    // worktree keeps HEAD apart from the shared refs). The branch is a loose file, or a line of
    // packed-refs once `git gc` packed it: then the next commit writes a loose file again into
    // the ref's directory, which is watched in its place.
    let exists = |path: &String| std::path::Path::new(path).exists();
    let branch_ref = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|branch| git(&["rev-parse", "--git-path", &branch]));
    let branch_watch = branch_ref.and_then(|path| {
        if exists(&path) {
            return Some(path);
        }
        let directory = std::path::Path::new(&path).parent()?.to_str()?.to_owned();
        exists(&directory).then_some(directory)
    });
    for path in
        [git(&["rev-parse", "--git-path", "HEAD"]), branch_watch, git(&["rev-parse", "--git-path", "packed-refs"])]
            .into_iter()
            .flatten()
            // A path that does not exist would make Cargo run this script on every build.
            .filter(exists)
    {
        println!("cargo:rerun-if-changed={path}");
    }
    Some(commit)
}
