//! Images named on a command line: files, folders of image files and embedded emoji icons.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::data::{DataError, ImageSource, Sample, has_image_extension};
use crate::io::embedding_files::parse_source_line;

/// Image files given on a command line: files as they are, folders expanded to the image
/// files inside them (recursively, sorted), and `emoji:CLASS:ICON` for embedded icons.
///
/// A symbolic link to a folder is followed only when it leads to a folder inside the tree
/// being walked and not yet walked, so that a loop (`self -> .`) ends and a link does not
/// drag in a foreign tree; [`collect_images_following`] follows links out of the tree too.
pub fn collect_images(args: &[PathBuf]) -> Result<Vec<ImageSource>, DataError> {
    collect(args, false)
}

/// [`collect_images`], following links to folders outside the tree (still once per folder).
pub fn collect_images_following(args: &[PathBuf]) -> Result<Vec<ImageSource>, DataError> {
    collect(args, true)
}

/// One recursive walk: the canonical folders already walked (which breaks cycles) and the
/// canonical root that links may not leave.
struct Walk {
    root: PathBuf,
    seen: HashSet<PathBuf>,
    follow_out: bool,
}

impl Walk {
    fn dir(&mut self, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
        let real = std::fs::canonicalize(dir).map_err(|e| DataError::list(dir, e))?;
        if !self.seen.insert(real) {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| DataError::list(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            let link = p
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink());
            if p.is_dir() {
                if link && !self.follow_out {
                    match std::fs::canonicalize(&p) {
                        Ok(target) if target.starts_with(&self.root) => {}
                        _ => continue,
                    }
                }
                self.dir(&p, out)?;
            } else if has_image_extension(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
}

fn collect(args: &[PathBuf], follow_out: bool) -> Result<Vec<ImageSource>, DataError> {
    let mut out = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if text.starts_with("emoji:") {
            out.push(
                parse_source_line(&text)
                    .ok_or_else(|| argument(arg, "not of the form emoji:CLASS:ICON"))?,
            );
        } else if arg.is_dir() {
            let root = std::fs::canonicalize(arg).map_err(|e| DataError::list(arg, e))?;
            let mut walk = Walk {
                root,
                seen: HashSet::new(),
                follow_out,
            };
            let mut files = Vec::new();
            walk.dir(arg, &mut files)?;
            if files.is_empty() {
                return Err(argument(arg, "holds no image files"));
            }
            out.extend(files.into_iter().map(ImageSource::File));
        } else if arg.is_file() {
            out.push(ImageSource::File(arg.clone()));
        } else if arg.symlink_metadata().is_ok() {
            return Err(argument(
                arg,
                "is a link to nothing, or neither a file nor a folder",
            ));
        } else {
            return Err(argument(arg, "does not exist"));
        }
    }
    Ok(out)
}

fn argument(path: &Path, message: &str) -> DataError {
    DataError::Argument {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Samples of images that have no class: label 0, which embedding ignores.
pub fn unlabelled_samples(sources: impl IntoIterator<Item = ImageSource>) -> Vec<Sample> {
    sources
        .into_iter()
        .map(|source| Sample { source, label: 0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    /// Issue 11: `self -> .` and `sub/up -> ..` made the walk run forever.
    #[test]
    fn symlink_loops_end_and_links_out_of_the_tree_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("q");
        touch(&root.join("a.jpg"));
        touch(&root.join("sub/b.png"));
        touch(&dir.path().join("outside/c.jpg"));
        std::os::unix::fs::symlink(".", root.join("self")).unwrap();
        std::os::unix::fs::symlink("..", root.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("out")).unwrap();
        let files = collect_images(std::slice::from_ref(&root)).unwrap();
        assert_eq!(
            files,
            vec![
                ImageSource::File(root.join("a.jpg")),
                ImageSource::File(root.join("sub/b.png")),
            ]
        );
        let files = collect_images_following(std::slice::from_ref(&root)).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
    }

    #[test]
    fn a_dangling_link_is_not_reported_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("gone.jpg");
        std::os::unix::fs::symlink(dir.path().join("nowhere.jpg"), &link).unwrap();
        let e = collect_images(&[link]).unwrap_err().to_string();
        assert!(e.contains("link to nothing"), "{e}");
    }
}
