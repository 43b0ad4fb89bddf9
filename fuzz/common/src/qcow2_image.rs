//! Target `qcow2_image`: [`blkback::Qcow2Image`] on a hostile image file
//! (with a hostile backing file beside it), read-only or writable, running
//! reads, writes, discards and flushes through [`blkback::DiskImage`]; or,
//! to check what the I/O returns, on a consistent image the harness makes.
//!
//! Properties, whatever the header, tables and extensions say: opening and
//! every operation return (`Ok` or `Err`), never panic or overflow the
//! stack (the panic guards of `Qcow2Image::open` and of the engine are not
//! counted on: `Qcow2Error::Panicked` or a panic here is a finding), and
//! nothing allocates beyond libFuzzer's RSS limit; a read past the end
//! fails. On an image the
//! harness made (imago's, any cluster size from 512 B to 4 KiB and refcount
//! width from 1 to 64 bits, alone or over a raw backing file) every
//! operation succeeds (writes fail read-only), a read returns what was last
//! written there, zeros after a discard and the backing file's bytes
//! elsewhere, and so does the image opened again after it was closed; a
//! read or write sent to the top file where `map_direct` maps it (as the
//! io_uring engine sends it) reads and writes the same bytes. A
//! hostile image has no such reference: its refcounts may call its own
//! metadata free, and imago (as QEMU without its overlap checks) then
//! writes data over it, so what it reads back is not checked.
//!
//! Input: a flags byte (bit 0: open writable; bit 1: the harness makes the
//! image, bits 2-3 its cluster size `512 << n`, bits 4-6 its refcount width
//! `1 << n`, bit 7 over the raw backing file), a size (`u16`: the made
//! image's, `(n % 2048 + 1) * 512` bytes), an operation count (`u8`, at
//! most 16), the operations (kind `u8`: read, write, discard or flush
//! (`n % 4`), bit 2 a read or write tried through `map_direct` first;
//! fill byte `u8`; offset `u32` taken modulo the disk size;
//! length `u8`, `(n % 128 + 1) * 512` bytes within the disk), the image's
//! length (`u16`), the image bytes (ignored for a made image), then the
//! bytes of the file named `backing` in the image's directory (the seeds'
//! images name it as their raw or qcow2 backing file).

use std::path::{Path, PathBuf};

use blkback::{DiskImage, LockKind, Qcow2Error, Qcow2Image};

use crate::input::Input;

/// Operations per input at most.
pub const MAX_OPS: usize = 16;

/// One operation on the open image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `read_at`.
    Read,
    /// `write_at` of the fill byte.
    Write,
    /// `discard`.
    Discard,
    /// `flush`.
    Flush,
}

/// An operation and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// What.
    pub kind: Kind,
    /// A read or write tried through [`Qcow2Image::map_direct`] first.
    pub direct: bool,
    /// The byte a write writes.
    pub fill: u8,
    /// Where (modulo the disk size, rounded down to 512 bytes).
    pub offset: u32,
    /// How much: `(len % 128 + 1) * 512` bytes, cut at the end of the disk.
    pub len: u8,
}

/// How the harness makes a consistent image (instead of the input's bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Made {
    /// `log2(cluster size) - 9`, 0..=3.
    pub cluster_shift: u8,
    /// `log2(refcount bits)`, 0..=6 (7 is taken as 6).
    pub refcount_order: u8,
    /// Over the raw backing file.
    pub backed: bool,
    /// Disk size: `(size % 2048 + 1) * 512` bytes.
    pub size: u16,
}

impl Made {
    fn disk_size(self) -> u64 {
        (u64::from(self.size) % 2048 + 1) * 512
    }
}

/// One decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// Open the image writable.
    pub writable: bool,
    /// A consistent image made by the harness, or the input's bytes.
    pub made: Option<Made>,
    /// The operations, in order.
    pub ops: Vec<Op>,
    /// The image file (unused for a made image).
    pub image: Vec<u8>,
    /// The file `backing` beside it.
    pub backing: Vec<u8>,
}

impl Case {
    /// Decodes an input (every byte string decodes to some case).
    pub fn decode(data: &[u8]) -> Case {
        let mut input = Input::new(data);
        let flags = input.u8();
        let size = input.u16();
        let made = (flags & 2 != 0).then_some(Made {
            cluster_shift: (flags >> 2) & 3,
            refcount_order: ((flags >> 4) & 7).min(6),
            backed: flags & 0x80 != 0,
            size,
        });
        let count = usize::from(input.u8()).min(MAX_OPS);
        let ops = (0..count)
            .map(|_| {
                let byte = input.u8();
                let kind = [Kind::Read, Kind::Write, Kind::Discard, Kind::Flush][usize::from(byte % 4)];
                Op { kind, direct: byte & 4 != 0, fill: input.u8(), offset: input.u32(), len: input.u8() }
            })
            .collect();
        let len = usize::from(input.u16());
        let image = input.bytes(len).to_vec();
        Case { writable: flags & 1 != 0, made, ops, image, backing: input.rest().to_vec() }
    }

    /// The input that decodes to this case.
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = u8::from(self.writable);
        let mut size = 0;
        if let Some(m) = self.made {
            flags |= 2 | (m.cluster_shift & 3) << 2 | (m.refcount_order & 7) << 4 | u8::from(m.backed) << 7;
            size = m.size;
        }
        let mut v = vec![flags];
        v.extend_from_slice(&size.to_le_bytes());
        v.push(self.ops.len() as u8);
        for op in &self.ops {
            let kind = [Kind::Read, Kind::Write, Kind::Discard, Kind::Flush].iter().position(|k| *k == op.kind);
            v.extend_from_slice(&[kind.expect("a kind") as u8 | u8::from(op.direct) << 2, op.fill]);
            v.extend_from_slice(&op.offset.to_le_bytes());
            v.push(op.len);
        }
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
    std::fs::write(&backing_path, &case.backing).expect("write the backing file");
    // What a consistent image reads: the backing file's bytes (zeros past
    // its end), or zeros.
    let mut model = case.made.map(|made| {
        make_image(&image_path, made);
        let mut bytes = if made.backed { case.backing.clone() } else { Vec::new() };
        bytes.resize(made.disk_size() as usize, 0);
        bytes
    });
    if model.is_none() {
        std::fs::write(&image_path, &case.image).expect("write the image");
    }
    let image = match Qcow2Image::open(&image_path, !case.writable, false) {
        Ok(image) => image,
        Err(e) => {
            assert!(!matches!(e, Qcow2Error::Panicked { .. }), "imago panicked opening the image: {e}");
            assert!(model.is_none(), "the harness's image is refused: {e}");
            return;
        }
    };
    let size = image.size();
    if let (Some(model), Some(made)) = (&model, case.made) {
        assert_eq!(size, model.len() as u64, "the made image's size");
        let chain = if made.backed { vec![backing_path.clone()] } else { Vec::new() };
        assert_eq!(image.backing_chain(), &chain[..]);
        assert_eq!((image.path(), image.is_direct(), image.is_read_only()), (&*image_path, false, !case.writable));
        // Version 3: discard is offered writable, freeing whole clusters.
        assert_eq!(image.supports_discard(), case.writable);
        assert_eq!(image.discard_granularity(), 512 << made.cluster_shift);
    }
    assert!(image.read_at(&mut [0u8; 512], size).is_err(), "a read past the end fails");
    if size == 0 {
        return;
    }
    for op in &case.ops {
        let offset = (u64::from(op.offset) % size) & !511;
        let len = ((u64::from(op.len) % 128 + 1) * 512).min(size - offset);
        let range = offset as usize..(offset + len) as usize;
        match op.kind {
            Kind::Read => {
                let mut buf = vec![0xa5u8; len as usize];
                let read = match op.direct.then(|| image.map_direct(offset, len, false)).flatten() {
                    Some(mapping) => read_direct(&image, &mapping, &mut buf),
                    None => image.read_at(&mut buf, offset),
                };
                if let Some(model) = &model {
                    read.unwrap_or_else(|e| panic!("read {range:?} of the made image: {e}"));
                    assert!(buf == model[range.clone()], "read {range:?}: not what was written");
                }
            }
            Kind::Write => {
                let buf = vec![op.fill; len as usize];
                let written = match op.direct.then(|| image.map_direct(offset, len, true)).flatten() {
                    Some(mapping) => write_direct(&image, &mapping, &buf),
                    None => image.write_at(&buf, offset),
                };
                if let Some(model) = &mut model {
                    match written {
                        Ok(()) if case.writable => model[range.clone()].copy_from_slice(&buf),
                        Err(_) if !case.writable => {}
                        _ => panic!("write {range:?} of the made image (writable {}): {written:?}", case.writable),
                    }
                    let mut back = vec![0x5au8; len as usize];
                    image.read_at(&mut back, offset).unwrap_or_else(|e| panic!("read back {range:?}: {e}"));
                    assert!(back == model[range.clone()], "read back {range:?}: not what was written");
                }
            }
            Kind::Discard => {
                let discarded = image.discard(offset, len, false);
                if let Some(model) = &mut model {
                    match discarded {
                        Ok(()) if case.writable => model[range.clone()].fill(0),
                        // Read-only: nothing offers discard, and imago refuses.
                        Err(_) if !case.writable => {}
                        _ => panic!("discard {range:?} of the made image (writable {}): {discarded:?}", case.writable),
                    }
                }
            }
            Kind::Flush => {
                let flushed = image.flush();
                if model.is_some() {
                    flushed.unwrap_or_else(|e| panic!("flush of the made image: {e}"));
                }
            }
        }
    }
    // Closing flushes; what was written is there when opened again. Opened
    // with QEMU's locks: a second writer is refused while one has it, and
    // closing releases them.
    drop(image);
    if let Some(model) = &model {
        let locked = |read_only| Qcow2Image::open_locked(&image_path, read_only, false, Some(LockKind::Ofd));
        let writer = locked(false).expect("the made image opens again, locked");
        assert!(matches!(locked(false), Err(Qcow2Error::Lock(_))), "a second writer is refused");
        drop(writer);
        let image = locked(true).expect("the made image opens again once its writer closed it");
        let mut all = vec![0xa5u8; model.len()];
        image.read_at(&mut all, 0).expect("read the made image again");
        assert!(all == *model, "after closing and opening again: not what was written");
    }
}

/// Reads `buf` where `mapping` points in the top file, as the io_uring
/// engine does; a short read (a hostile mapping past the file's end) fails.
fn read_direct(image: &Qcow2Image, mapping: &blkback::DirectMapping, buf: &mut [u8]) -> std::io::Result<()> {
    let file = std::fs::File::from(image.top_file().try_clone_to_owned()?);
    std::os::unix::fs::FileExt::read_exact_at(&file, buf, mapping.host_offset)
}

/// Writes `buf` where `mapping` points in the top file.
fn write_direct(image: &Qcow2Image, mapping: &blkback::DirectMapping, buf: &[u8]) -> std::io::Result<()> {
    let file = std::fs::File::from(image.top_file().try_clone_to_owned()?);
    std::os::unix::fs::FileExt::write_all_at(&file, buf, mapping.host_offset)
}

/// Makes a consistent image at `path` as `made` says (v3, no data).
fn make_image(path: &Path, made: Made) {
    use imago::file::File;
    use imago::qcow2::Qcow2;
    use imago::{FormatCreateBuilder, StorageOpenOptions};
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).expect("image file");
    let storage = File::from_open_file(file, StorageOpenOptions::new().write(true).filename(path)).expect("storage");
    let mut create = Qcow2::<File>::create_builder(storage)
        .size(made.disk_size())
        .cluster_size(512 << made.cluster_shift)
        .refcount_width(1 << made.refcount_order);
    if made.backed {
        create = create.backing("backing".into(), "raw".into());
    }
    create.create().expect("create the image");
}

/// Seeds: images made by imago with 512-byte clusters (small enough for
/// the smoke run's 16 KiB inputs), empty and with data, without a backing
/// file and over a raw or qcow2 one, each written, read, discarded and
/// flushed; a version 2 image naming its backing format in an extension
/// (which imago does not read there); an image that names itself as its
/// backing file; and images the harness makes, of each cluster size, also
/// read and written through `map_direct`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let plain = image(None, &[(0, 0x11), (3 << 10, 0x22)]);
    let over_raw = image(Some(("backing", "raw")), &[(1 << 10, 0x33)]);
    let over_qcow2 = image(Some(("backing", "qcow2")), &[(2 << 10, 0x44)]);
    let over_itself = image(Some(("image", "qcow2")), &[]);
    let op = |kind, fill, offset, len| Op { kind, direct: false, fill, offset, len };
    let io = vec![
        op(Kind::Read, 0, 512, 3),
        op(Kind::Write, 0x77, 1536, 4),
        op(Kind::Read, 0, 1024, 7),
        op(Kind::Discard, 0, 2048, 1),
        op(Kind::Flush, 0, 0, 0),
        op(Kind::Write, 0x88, 6144, 1),
        op(Kind::Read, 0, 0, 15),
    ];
    let case = |writable, image: &Vec<u8>, backing: Vec<u8>| {
        Case { writable, made: None, ops: io.clone(), image: image.clone(), backing }.encode()
    };
    let direct_io: Vec<Op> = io.iter().map(|&op| Op { direct: true, ..op }).collect();
    let made_with = |ops: &Vec<Op>, writable, cluster_shift, refcount_order, backed, size| {
        let made = Some(Made { cluster_shift, refcount_order, backed, size });
        let backing = if backed { (0..6000u32).map(|i| (i % 253) as u8).collect() } else { Vec::new() };
        Case { writable, made, ops: ops.clone(), image: Vec::new(), backing }.encode()
    };
    let made = |writable, cluster_shift, refcount_order, backed, size| {
        made_with(&io, writable, cluster_shift, refcount_order, backed, size)
    };
    vec![
        ("empty-read-only", case(false, &image(None, &[]), Vec::new())),
        ("data-read-only", case(false, &plain, Vec::new())),
        ("data-writable", case(true, &plain, Vec::new())),
        ("over-raw", case(true, &over_raw, vec![0x5a; 8 << 10])),
        ("over-qcow2", case(true, &over_qcow2, plain.clone())),
        ("over-missing-backing", case(false, &over_raw, Vec::new())),
        ("made-512-refcount-64", made(true, 0, 6, false, 31)),
        ("made-1k-refcount-1-over-raw", made(true, 1, 0, true, 40)),
        ("made-2k-refcount-16-read-only", made(false, 2, 4, true, 15)),
        ("made-4k-refcount-8", made(true, 3, 3, false, 2047)),
        ("v2-over-raw-named-in-an-extension", case(true, &as_version_2(&over_raw), vec![0x6b; 8 << 10])),
        ("over-itself", case(false, &over_itself, Vec::new())),
        ("made-512-direct", made_with(&direct_io, true, 0, 4, false, 31)),
        ("made-4k-direct-over-raw", made_with(&direct_io, true, 3, 4, true, 40)),
        ("made-1k-direct-read-only", made_with(&direct_io, false, 1, 4, false, 20)),
    ]
}

/// A qcow2 image of 8 KiB with 512-byte clusters, `writes` of 512 bytes
/// (offset, fill byte) allocated, naming `backing` (file name, format) as
/// its backing file.
fn image(backing: Option<(&str, &str)>, writes: &[(u64, u8)]) -> Vec<u8> {
    use imago::file::File;
    use imago::qcow2::Qcow2;
    use imago::{FormatAccess, FormatCreateBuilder, StorageOpenOptions};
    let path = case_dir().join("seed");
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("seed file");
    let storage = File::from_open_file(file, StorageOpenOptions::new().write(true).filename(&path)).expect("storage");
    let mut create = Qcow2::<File>::create_builder(storage).size(8 << 10).cluster_size(512);
    if let Some((name, format)) = backing {
        create = create.backing(name.into(), format.into());
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

/// A version 3 image of imago's as version 2: the version field set, the
/// header extensions moved to where version 2 has them (after its 72-byte
/// header, up to the backing file's name, which stays where it was).
fn as_version_2(image: &[u8]) -> Vec<u8> {
    let be32 = |at: usize| u32::from_be_bytes(image[at..at + 4].try_into().expect("4 bytes"));
    let header_length = be32(100) as usize;
    let name_offset = u64::from_be_bytes(image[8..16].try_into().expect("8 bytes")) as usize;
    assert!(name_offset > header_length, "the backing file's name follows the extensions");
    let mut v2 = image.to_vec();
    v2[4..8].copy_from_slice(&2u32.to_be_bytes());
    v2.copy_within(header_length..name_offset, 72);
    v2[72 + name_offset - header_length..name_offset].fill(0);
    v2
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
        // Writable, one write, a 256-byte image with a v3 header of 0xff.
        let mut header = b"\x01\x00\x00\x01\x01\xff\x00\x10\x00\x00\x00\x00\x01QFI\xfb\x00\x00\x00\x03".to_vec();
        header.resize(400, 0xff);
        run(&header);
    }
}
