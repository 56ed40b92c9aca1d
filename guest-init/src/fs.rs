//! File system operations the host asks for ([`FsRequest`]): stat, list,
//! make a directory, remove, rename. Each answers with the entries it
//! found or made, in frames of a bounded size, or with why it failed.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use guest_protocol::agent::{
    Entry, EntryKind, FsErrorKind, FsRequest, GuestMessage, ENTRIES_PER_FRAME, MAX_LIST_ENTRIES,
};

/// Roughly how many bytes of entries go in one frame (well under the frame
/// limit: a path is at most 4096 bytes).
const FRAME_BUDGET: usize = 256 * 1024;

/// A failed operation, as the host is told.
#[derive(Debug)]
pub(crate) struct FsError {
    pub kind: FsErrorKind,
    pub message: String,
}

impl FsError {
    fn io(path: &Path, e: &io::Error) -> FsError {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => FsErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => FsErrorKind::AlreadyExists,
            io::ErrorKind::PermissionDenied => FsErrorKind::PermissionDenied,
            io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory | io::ErrorKind::DirectoryNotEmpty => {
                FsErrorKind::NotADirectory
            }
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => FsErrorKind::InvalidInput,
            _ => FsErrorKind::Other,
        };
        FsError { kind, message: format!("{}: {e}", path.display()) }
    }

    fn invalid(message: String) -> FsError {
        FsError { kind: FsErrorKind::InvalidInput, message }
    }

    pub(crate) fn into_message(self) -> GuestMessage {
        GuestMessage::FsFailed { kind: self.kind, message: self.message }
    }
}

/// Carry out `request`, handing each batch of entries to `send`.
pub(crate) fn serve(request: FsRequest, send: &mut dyn FnMut(GuestMessage) -> io::Result<()>) -> Result<(), FsError> {
    let mut names = Names::default();
    let mut batch = Batch::new(send);
    match request {
        FsRequest::Stat { path } => {
            let path = absolute(&path)?;
            batch.push(entry(&path, &mut names)?)?;
        }
        FsRequest::List { path, depth } => {
            let path = absolute(&path)?;
            let meta = std::fs::metadata(&path).map_err(|e| FsError::io(&path, &e))?;
            if !meta.is_dir() {
                return Err(FsError {
                    kind: FsErrorKind::NotADirectory,
                    message: format!("{}: not a directory", path.display()),
                });
            }
            let mut left = MAX_LIST_ENTRIES;
            list(&path, depth.max(1), &mut names, &mut batch, &mut left)?;
        }
        FsRequest::MakeDir { path } => {
            let path = absolute(&path)?;
            if std::fs::symlink_metadata(&path).is_ok() {
                return Err(FsError {
                    kind: FsErrorKind::AlreadyExists,
                    message: format!("{}: already exists", path.display()),
                });
            }
            std::fs::create_dir_all(&path).map_err(|e| FsError::io(&path, &e))?;
            batch.push(entry(&path, &mut names)?)?;
        }
        FsRequest::Remove { path } => {
            let path = absolute(&path)?;
            let meta = std::fs::symlink_metadata(&path).map_err(|e| FsError::io(&path, &e))?;
            let removed = if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.map_err(|e| FsError::io(&path, &e))?;
        }
        FsRequest::Rename { from, to } => {
            let (from, to) = (absolute(&from)?, absolute(&to)?);
            std::fs::rename(&from, &to).map_err(|e| FsError::io(&from, &e))?;
            batch.push(entry(&to, &mut names)?)?;
        }
    }
    batch.flush()
}

/// `path`, which must be absolute and free of NUL bytes.
fn absolute(path: &str) -> Result<PathBuf, FsError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(FsError::invalid(format!("{path:?} is not an absolute path")));
    }
    Ok(PathBuf::from(path))
}

/// The entries of `dir` and, below `depth` 1, of its subdirectories (not
/// through symbolic links), at most `left` of them.
fn list(dir: &Path, depth: u32, names: &mut Names, batch: &mut Batch<'_>, left: &mut usize) -> Result<(), FsError> {
    let children = std::fs::read_dir(dir).map_err(|e| FsError::io(dir, &e))?;
    for child in children {
        let Ok(child) = child else { continue };
        if *left == 0 {
            return Ok(());
        }
        *left -= 1;
        let path = child.path();
        // An entry removed since it was listed is skipped.
        let Ok(found) = entry(&path, names) else { continue };
        let descend = depth > 1 && found.kind == EntryKind::Directory;
        batch.push(found)?;
        if descend {
            // A subdirectory that cannot be read is listed without its entries.
            let _ = list(&path, depth - 1, names, batch, left);
        }
    }
    Ok(())
}

/// The entry at `path`, as `lstat` sees it.
fn entry(path: &Path, names: &mut Names) -> Result<Entry, FsError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| FsError::io(path, &e))?;
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        EntryKind::Symlink
    } else if file_type.is_dir() {
        EntryKind::Directory
    } else if file_type.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let symlink_target = if file_type.is_symlink() {
        std::fs::read_link(path).ok().map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    let name = path.file_name().map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Entry {
        name,
        path: path.to_string_lossy().into_owned(),
        kind,
        size: meta.size(),
        mode: meta.mode(),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified: (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0)),
        symlink_target,
    })
}

/// Entries on their way to the host, sent in frames of bounded size.
struct Batch<'a> {
    send: &'a mut dyn FnMut(GuestMessage) -> io::Result<()>,
    entries: Vec<Entry>,
    bytes: usize,
}

impl<'a> Batch<'a> {
    fn new(send: &'a mut dyn FnMut(GuestMessage) -> io::Result<()>) -> Batch<'a> {
        Batch { send, entries: Vec::new(), bytes: 0 }
    }

    fn push(&mut self, entry: Entry) -> Result<(), FsError> {
        self.bytes += 64
            + entry.name.len()
            + entry.path.len()
            + entry.owner.len()
            + entry.group.len()
            + entry.symlink_target.as_ref().map_or(0, String::len);
        self.entries.push(entry);
        if self.entries.len() >= ENTRIES_PER_FRAME || self.bytes >= FRAME_BUDGET {
            self.send_entries()?;
        }
        Ok(())
    }

    fn send_entries(&mut self) -> Result<(), FsError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let entries = std::mem::take(&mut self.entries);
        (self.send)(GuestMessage::Entries(entries))
            .map_err(|e| FsError { kind: FsErrorKind::Other, message: format!("send entries: {e}") })
    }

    fn flush(mut self) -> Result<(), FsError> {
        self.send_entries()
    }
}

/// User and group names by number, read from /etc/passwd and /etc/group
/// once per request.
#[derive(Default)]
struct Names {
    users: Option<HashMap<u32, String>>,
    groups: Option<HashMap<u32, String>>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        let users = self.users.get_or_insert_with(|| read_names("/etc/passwd"));
        users.get(&uid).cloned().unwrap_or_else(|| uid.to_string())
    }

    fn group(&mut self, gid: u32) -> String {
        let groups = self.groups.get_or_insert_with(|| read_names("/etc/group"));
        groups.get(&gid).cloned().unwrap_or_else(|| gid.to_string())
    }
}

/// name by number from a passwd- or group-style file (`name:x:number:...`).
fn read_names(file: &str) -> HashMap<u32, String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut names = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        if let (Some(name), Some(_), Some(number)) = (fields.next(), fields.next(), fields.next()) {
            if let Ok(number) = number.parse() {
                names.entry(number).or_insert_with(|| name.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(request: FsRequest) -> Result<Vec<Entry>, FsError> {
        let mut got = Vec::new();
        serve(request, &mut |msg| {
            match msg {
                GuestMessage::Entries(e) => got.extend(e),
                other => panic!("unexpected {other:?}"),
            }
            Ok(())
        })?;
        Ok(got)
    }

    #[test]
    fn stat_list_make_rename_remove() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        std::fs::write(dir.path().join("a.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("a.txt", dir.path().join("link")).unwrap();

        let made = run(FsRequest::MakeDir { path: format!("{root}/x/y") }).unwrap();
        assert_eq!((made.len(), made[0].name.as_str(), made[0].kind), (1, "y", EntryKind::Directory));
        std::fs::write(dir.path().join("x/y/deep"), b"").unwrap();
        let again = run(FsRequest::MakeDir { path: format!("{root}/x/y") }).unwrap_err();
        assert_eq!(again.kind, FsErrorKind::AlreadyExists);

        let stat = run(FsRequest::Stat { path: format!("{root}/a.txt") }).unwrap();
        assert_eq!((stat[0].size, stat[0].kind, stat[0].mode & 0o170_000), (5, EntryKind::File, 0o100_000));
        assert!(stat[0].modified.0 > 0);
        let link = run(FsRequest::Stat { path: format!("{root}/link") }).unwrap();
        assert_eq!((link[0].kind, link[0].symlink_target.as_deref()), (EntryKind::Symlink, Some("a.txt")));

        let mut one: Vec<String> = run(FsRequest::List { path: root.clone(), depth: 1 })
            .unwrap()
            .into_iter()
            .map(|e| e.path.strip_prefix(&root).unwrap().to_string())
            .collect();
        one.sort();
        assert_eq!(one, ["/a.txt", "/link", "/x"]);
        let three = run(FsRequest::List { path: root.clone(), depth: 3 }).unwrap();
        assert!(three.iter().any(|e| e.path == format!("{root}/x/y/deep")), "{three:?}");
        let two = run(FsRequest::List { path: root.clone(), depth: 2 }).unwrap();
        assert!(two.iter().any(|e| e.path == format!("{root}/x/y")) && two.len() == 4, "{two:?}");

        let renamed = run(FsRequest::Rename { from: format!("{root}/a.txt"), to: format!("{root}/b.txt") }).unwrap();
        assert_eq!(renamed[0].name, "b.txt");
        run(FsRequest::Remove { path: format!("{root}/x") }).unwrap();
        let gone = run(FsRequest::Stat { path: format!("{root}/x/y") }).unwrap_err();
        assert_eq!(gone.kind, FsErrorKind::NotFound);
        let not_dir = run(FsRequest::List { path: format!("{root}/b.txt"), depth: 1 }).unwrap_err();
        assert_eq!(not_dir.kind, FsErrorKind::NotADirectory);
        let relative = run(FsRequest::Stat { path: "etc".into() }).unwrap_err();
        assert_eq!(relative.kind, FsErrorKind::InvalidInput);
    }

    #[test]
    fn big_listings_come_in_several_frames() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..(ENTRIES_PER_FRAME * 2 + 3) {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
        let mut frames = 0;
        let mut count = 0;
        serve(FsRequest::List { path: dir.path().to_str().unwrap().into(), depth: 1 }, &mut |msg| {
            if let GuestMessage::Entries(e) = msg {
                assert!(e.len() <= ENTRIES_PER_FRAME);
                count += e.len();
            }
            frames += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((count, frames), (ENTRIES_PER_FRAME * 2 + 3, 3));
    }
}
