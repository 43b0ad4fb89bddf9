//! Target `qcow2_image`: [`blkback::Qcow2Image::open`] of a hostile image
//! file (with a hostile backing file beside it), read-only or writable,
//! then reads and a flush through [`blkback::DiskImage`].
//!
//! Properties: opening never panics (a panic inside imago becomes
//! `Qcow2Error::Panicked`) and nothing allocates beyond libFuzzer's RSS
//! limit, whatever the header, tables and extensions say; on a successful
//! open, a read past the end fails.
//!
//! Input: a flags byte (bit 0: open writable), a read offset (`u32`, taken
//! modulo the disk size), the image's length (`u16`), the image bytes, then
//! the bytes of the file named `backing` in the image's directory (the seeds'
//! images name it as their raw or qcow2 backing file).

use std::path::PathBuf;

use blkback::{DiskImage, Qcow2Image};

use crate::input::Input;

/// One decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// Open the image writable.
    pub writable: bool,
    /// Where to read (modulo the disk size).
    pub offset: u32,
    /// The image file.
    pub image: Vec<u8>,
    /// The file `backing` beside it.
    pub backing: Vec<u8>,
}

impl Case {
    /// Decodes an input (every byte string decodes to some case).
    pub fn decode(data: &[u8]) -> Case {
        let mut input = Input::new(data);
        let writable = input.u8() & 1 != 0;
        let offset = input.u32();
        let len = usize::from(input.u16());
        let image = input.bytes(len).to_vec();
        Case { writable, offset, image, backing: input.rest().to_vec() }
    }

    /// The input that decodes to this case.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![u8::from(self.writable)];
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&(self.image.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.image);
        v.extend_from_slice(&self.backing);
        v
    }
}

/// A directory of this process for the files of one case.
fn case_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fuzz-qcow2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

/// The harness.
pub fn run(data: &[u8]) {
    let case = Case::decode(data);
    let dir = case_dir();
    let (image_path, backing_path) = (dir.join("image"), dir.join("backing"));
    std::fs::write(&image_path, &case.image).expect("write the image");
    std::fs::write(&backing_path, &case.backing).expect("write the backing file");
    let Ok(image) = Qcow2Image::open(&image_path, !case.writable, false) else { return };
    let size = image.size();
    if size == 0 {
        return;
    }
    let offset = (u64::from(case.offset) % size) & !511;
    let len = (size - offset).min(64 << 10) as usize & !511;
    assert!(image.read_at(&mut [0u8; 512], size).is_err(), "a read past the end fails");
    // As the thread-pool engine runs them (`guarded`): a panic in the
    // format layer fails the operation. Writes and discards are left out:
    // imago 0.2.6 can recurse without bound allocating refcount blocks for a
    // hostile refcount table (a stack overflow, which no guard catches:
    // fuzz/upstream/imago-0.2.6-refblock-recursion).
    let _ = std::panic::catch_unwind(|| {
        let mut buf = vec![0xa5u8; len];
        let _ = image.read_at(&mut buf, offset);
        if case.writable {
            let _ = image.flush();
        }
    });
}

/// Seeds: images made by imago with 512-byte clusters (small enough for
/// the smoke run's 16 KiB inputs), empty and with data, without a backing
/// file and over a raw or qcow2 one.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let plain = image(None, &[(0, 0x11), (3 << 10, 0x22)]);
    let over_raw = image(Some("raw"), &[(1 << 10, 0x33)]);
    let over_qcow2 = image(Some("qcow2"), &[(2 << 10, 0x44)]);
    let case = |writable, offset, image: &Vec<u8>, backing: Vec<u8>| {
        Case { writable, offset, image: image.clone(), backing }.encode()
    };
    vec![
        ("empty-read-only", case(false, 0, &image(None, &[]), Vec::new())),
        ("data-read-only", case(false, 512, &plain, Vec::new())),
        ("data-writable", case(true, 3 << 10, &plain, Vec::new())),
        ("over-raw", case(true, 1 << 10, &over_raw, vec![0x5a; 8 << 10])),
        ("over-qcow2", case(false, 0, &over_qcow2, plain.clone())),
        ("over-missing-backing", case(false, 0, &over_raw, Vec::new())),
    ]
}

/// A qcow2 image of 8 KiB with 512-byte clusters, `writes` of 512 bytes
/// (offset, fill byte) allocated, naming `backing` (of that format) as its
/// backing file.
fn image(backing_format: Option<&str>, writes: &[(u64, u8)]) -> Vec<u8> {
    use imago::file::File;
    use imago::qcow2::Qcow2;
    use imago::{FormatAccess, FormatCreateBuilder, StorageOpenOptions};
    let path = case_dir().join("seed");
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("seed file");
    let storage = File::from_open_file(file, StorageOpenOptions::new().write(true).filename(&path)).expect("storage");
    let mut create = Qcow2::<File>::create_builder(storage).size(8 << 10).cluster_size(512);
    if let Some(format) = backing_format {
        create = create.backing("backing".into(), format.into());
    }
    create.create().expect("create the seed image");
    if !writes.is_empty() {
        let mut qcow2 = Qcow2::<File>::open_path(&path, true).expect("open the seed image");
        qcow2.set_backing(None);
        let qcow2 = FormatAccess::new(qcow2);
        for &(offset, byte) in writes {
            qcow2.write(&[byte; 512][..], offset).expect("write the seed image");
        }
        qcow2.flush().expect("flush the seed image");
    }
    let bytes = std::fs::read(&path).expect("read the seed image");
    std::fs::remove_file(&path).expect("remove the seed image");
    sorted_feature_names(bytes)
}

/// `image` with the entries of its feature name table (header extension
/// 0x6803f857, 48 bytes each) sorted: imago writes them in a hash map's
/// order, and the committed seeds must not change from run to run.
fn sorted_feature_names(mut image: Vec<u8>) -> Vec<u8> {
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let mut at = be32(&image, 100) as usize;
    while at + 8 <= image.len() {
        let (kind, len) = (be32(&image, at), be32(&image, at + 4) as usize);
        at += 8;
        if kind == 0 || at + len > image.len() {
            break;
        }
        if kind == 0x6803_f857 {
            let mut entries: Vec<Vec<u8>> = image[at..at + len].chunks(48).map(<[u8]>::to_vec).collect();
            entries.sort();
            image[at..at + len].copy_from_slice(&entries.concat());
        }
        at += len.next_multiple_of(8);
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_round_trip_and_fit_the_smoke_runs_inputs() {
        for (name, bytes) in seeds() {
            assert_eq!(Case::decode(&bytes).encode(), bytes, "{name}");
            assert!(bytes.len() <= 16384, "{name}: {} bytes", bytes.len());
        }
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 300]);
        let mut header = b"\x01\x00\x00\x00\x00\x00\x01QFI\xfb\x00\x00\x00\x03".to_vec();
        header.resize(400, 0xff);
        run(&header);
    }
}
