//! Property tests over mutated inputs: checkpoints (the pickle inside a zip archive, the
//! pickles of a legacy file, whole files), PNGs and JPEGs. Every mutated input must decode or
//! give an error naming the file; no panic may escape and no lying header may make a reader
//! allocate its claim. `EVAX_FUZZ_ITERS=N` runs longer (default: a quick pass).

mod common;
use common::*;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use evax::checkpoint::{Checkpoint, pickle};
use evax::fixtures::shared_or_skip;
use evax::model::{LoadOptions, registry};
use evax::preprocess::{Image, Normalization, Preprocess};

/// The entries of a zip archive, in order.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().unwrap().into_owned(), b)
        })
        .collect()
}

fn rezip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut out);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, b) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap();
    out.into_inner()
}

/// Parse a checkpoint and, for EVA-X weights, build the model as `evax predict` does.
fn load(bytes: &[u8], name: &str, build: bool) -> Result<(), String> {
    let ck = Checkpoint::from_bytes(bytes, PathBuf::from(name), None).map_err(|e| e.to_string())?;
    if build {
        registry::load(&ck, &LoadOptions::default()).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

#[test]
fn mutated_checkpoints_never_panic() {
    let Some(sh) = shared_or_skip("mutated_checkpoints_never_panic") else {
        return;
    };
    let fixtures = sh.join("fixtures");
    // The Ti MIM archive, with only its pickle mutated (the storages are most of its bytes).
    let entries = unzip(&std::fs::read(fixtures.join("eva_x_ti_mim_fp16.pt")).unwrap());
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .expect("data.pkl");
    // The legacy file: its five pickles (magic, protocol, sys info, object, storage keys) are
    // mutated, the storages after them kept.
    let legacy = std::fs::read(fixtures.join("eva_x_ti_mim_fp16_legacy.pt")).unwrap();
    let mut end = 0;
    for _ in 0..5 {
        end = pickle::unpickle(&legacy, end, &mut pickle::KeepPersistent)
            .unwrap()
            .1;
    }
    // Whole small files (container structure too).
    let small_zip = std::fs::read(fixtures.join("densenet121_b2222_cxr14_ft.pth")).unwrap();
    let small_legacy =
        std::fs::read(fixtures.join("densenet121_b2222_imagenet_oldkeys_legacy.pth")).unwrap();
    let mut tally = FuzzTally::default();
    let mut kinds = [0u64; 4];
    for k in fuzz_range(200) {
        let kind = (k % 4) as usize;
        kinds[kind] += 1;
        // (the DenseNet files are parsed only: their family is not built here)
        let (name, bytes, build) = match kind {
            0 => {
                let mut e = entries.clone();
                e[pkl].1 = mutate(k, &entries[pkl].1);
                ("ti_zip_pickle.pt", rezip(&e), true)
            }
            1 => {
                let mut b = mutate(k, &legacy[..end]);
                b.extend_from_slice(&legacy[end..]);
                ("ti_legacy_pickles.pt", b, true)
            }
            2 => ("densenet_zip.pth", mutate(k, &small_zip), false),
            _ => ("densenet_legacy.pth", mutate(k, &small_legacy), false),
        };
        tally.run(k, name, || load(&bytes, name, build));
    }
    assert!(
        kinds.iter().all(|&n| n > 0),
        "every kind mutated: {kinds:?}"
    );
    tally.report("checkpoints", 2048.0);
}

/// Decode and preprocess as `evax predict` does.
fn decode(bytes: &[u8], name: &str) -> Result<(), String> {
    let img = Image::decode(bytes).map_err(|e| format!("{name}: {e}"))?;
    let x = Preprocess::eval((224, 224), Normalization::EVAX).apply(&img);
    assert_eq!(x.len(), 3 * 224 * 224);
    Ok(())
}

/// Every shared image with one of `exts`, by name.
fn images(sh: &Path, exts: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(sh.join("fixtures/images"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The chunks of a PNG after its signature: (type and data, CRC position).
fn png_chunks(b: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 12 <= b.len() {
        let len = u32::from_be_bytes(b[pos..pos + 4].try_into().unwrap()) as usize;
        if pos + 12 + len > b.len() {
            break;
        }
        out.push(pos + 4..pos + 8 + len);
        pos += 12 + len;
    }
    out
}

/// A PNG mutated inside one chunk's data with the CRCs made right again, so the decoder's
/// own parsing (not just the checksum) meets the damage; every other seed, a raw mutation.
fn mutate_png(k: u64, src: &[u8]) -> Vec<u8> {
    if k.is_multiple_of(2) {
        return mutate(k, src);
    }
    let chunks: Vec<_> = png_chunks(src)
        .into_iter()
        .filter(|c| c.len() > 4)
        .collect();
    let c = chunks[(k as usize / 2) % chunks.len()].clone();
    let mut data = mutate(k, &src[c.start + 4..c.end]);
    data.resize(c.end - c.start - 4, 0); // keep the declared length
    let mut out = src[..c.start].to_vec();
    out.extend_from_slice(&src[c.start..c.start + 4]);
    out.extend_from_slice(&data);
    let mut crc = flate2::Crc::new();
    crc.update(&out[c.start..]);
    out.extend_from_slice(&crc.sum().to_be_bytes());
    out.extend_from_slice(&src[c.end + 4..]);
    out
}

fn fuzz_images(what: &str, files: &[(String, Vec<u8>)], default: u64) {
    let mut tally = FuzzTally::default();
    for k in fuzz_range(default) {
        let (name, src) = &files[(k as usize) % files.len()];
        let bytes = if what == "PNG" {
            mutate_png(k, src)
        } else {
            mutate(k, src)
        };
        tally.run(k, name, || decode(&bytes, name));
    }
    tally.report(what, 2048.0);
}

#[test]
fn mutated_pngs_never_panic() {
    let Some(sh) = shared_or_skip("mutated_pngs_never_panic") else {
        return;
    };
    let files = images(&sh, &["png"]);
    assert_eq!(files.len(), 5, "PNGs in the shared fixtures");
    fuzz_images("PNG", &files, 100);
}

#[test]
fn mutated_jpegs_never_panic() {
    let Some(sh) = shared_or_skip("mutated_jpegs_never_panic") else {
        return;
    };
    let files = images(&sh, &["jpg"]);
    assert_eq!(files.len(), 2, "JPEGs in the shared fixtures");
    fuzz_images("JPEG", &files, 200);
}
