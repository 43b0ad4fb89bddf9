//! `xenbackd install-links`: the xenstore-utils names (`xenstore`,
//! `xenstore-read`, ...) as symlinks to this binary, which runs as the tool
//! its name says (`crate::xs::run_as`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::xs::Mode;

/// Install the xenstore-* tools as symlinks to this binary
///
/// Creates DIR/xenstore and DIR/xenstore-<mode> for every mode (read write
/// ls list rm mkdir chmod exists watch control) as symlinks to this xenbackd, so
/// that scripts written for Debian's xenstore-utils run unchanged on a dom0
/// without them. A name that exists and is not already such a link is left
/// alone, with a message and exit status 1, unless --force.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct LinksArgs {
    /// Directory the links go in (it must exist)
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    dir: PathBuf,
    /// Replace files of those names that are something else
    #[arg(long)]
    force: bool,
    /// The binary the links point to (default: this one, as the kernel
    /// reports its path)
    #[arg(long, value_name = "PATH")]
    target: Option<PathBuf>,
}

/// The names installed.
fn names() -> Vec<String> {
    ["xenstore", crate::xs::CONTROL_TOOL]
        .into_iter()
        .map(String::from)
        .chain(Mode::ALL.iter().map(|m| format!("xenstore-{}", m.name())))
        .collect()
}

/// What happened to one name.
#[derive(Debug, PartialEq)]
enum Outcome {
    Created,
    AlreadyThere,
    Replaced,
    /// Exists and is something else; left alone.
    Kept(String),
}

fn install(link: &Path, target: &Path, force: bool) -> Result<Outcome> {
    let existing = match std::fs::symlink_metadata(link) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("looking at {}", link.display())),
    };
    let Some(meta) = existing else {
        std::os::unix::fs::symlink(target, link).with_context(|| format!("creating {}", link.display()))?;
        return Ok(Outcome::Created);
    };
    if meta.file_type().is_symlink() && std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(Outcome::AlreadyThere);
    }
    if !force {
        let what = match std::fs::read_link(link) {
            Ok(t) => format!("a link to {}", t.display()),
            Err(_) if meta.is_dir() => "a directory".into(),
            Err(_) => "a file".into(),
        };
        return Ok(Outcome::Kept(what));
    }
    if meta.is_dir() {
        anyhow::bail!("{} is a directory; not replacing it", link.display());
    }
    // A new link beside it, renamed over it: the name never goes missing.
    let tmp = link.with_file_name(format!(".{}.xenbackd-new", link.file_name().unwrap_or_default().to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::rename(&tmp, link).with_context(|| format!("replacing {}", link.display()))?;
    Ok(Outcome::Replaced)
}

/// Runs `install-links`; exit status 1 if a name was left alone.
pub fn run(args: LinksArgs) -> Result<u8> {
    let target = match args.target {
        Some(t) => t,
        None => std::env::current_exe().context("finding this binary's path")?,
    };
    if !args.dir.is_dir() {
        anyhow::bail!("{} is not a directory", args.dir.display());
    }
    let mut kept = 0;
    for name in names() {
        let link = args.dir.join(&name);
        match install(&link, &target, args.force)? {
            Outcome::Created => println!("{} -> {}", link.display(), target.display()),
            Outcome::Replaced => println!("{} -> {} (replaced)", link.display(), target.display()),
            Outcome::AlreadyThere => println!("{} -> {} (already)", link.display(), target.display()),
            Outcome::Kept(what) => {
                eprintln!("xenbackd: {} is {what}; left alone (--force replaces it)", link.display());
                kept += 1;
            }
        }
    }
    Ok(u8::from(kept > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_name_is_one_the_binary_answers_to() {
        let names = names();
        assert_eq!(names.len(), 11);
        assert!(names.iter().all(|n| crate::xs::is_tool_name(n)), "{names:?}");
    }

    #[test]
    fn links_are_made_kept_or_replaced() {
        let dir = std::env::temp_dir().join(format!("xenbackd-links-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = Path::new("/usr/sbin/xenbackd");
        let (read, write) = (dir.join("xenstore-read"), dir.join("xenstore-write"));
        std::fs::write(&write, b"#!/bin/sh\n").unwrap();
        assert_eq!(install(&read, target, false).unwrap(), Outcome::Created);
        assert_eq!(install(&read, target, false).unwrap(), Outcome::AlreadyThere);
        assert_eq!(install(&write, target, false).unwrap(), Outcome::Kept("a file".into()));
        assert_eq!(std::fs::read(&write).unwrap(), b"#!/bin/sh\n", "kept as it was");
        assert_eq!(install(&write, target, true).unwrap(), Outcome::Replaced);
        assert_eq!(std::fs::read_link(&write).unwrap(), target);
        assert_eq!(
            install(&read, Path::new("/other"), false).unwrap(),
            Outcome::Kept("a link to /usr/sbin/xenbackd".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
