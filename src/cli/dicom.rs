//! `evax dicom`: header summary and export.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use evax::dicom::{self, DicomFile, voi::VoiChoice};

/// DICOM tools: header summary, export to PNG / NPY.
#[derive(Subcommand)]
pub enum Command {
    /// Transfer syntax, photometric, bits, size, frames, windows, modality, body part, spacing.
    Info {
        /// The DICOM file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export to PNG (the 8-bit image the models see) or NPY.
    Export {
        /// The DICOM file.
        file: PathBuf,
        /// Output: .png or .npy.
        #[arg(short, long)]
        output: PathBuf,
        /// VOI: none (min-max), first (the first window; default) or a window number N.
        #[arg(long, default_value = "first")]
        voi: String,
        /// NPY of the stored values (sign applied, no LUT), shaped [frames, rows, cols, samples].
        #[arg(long)]
        raw: bool,
        /// Frame to export (0-based; default the first).
        #[arg(long, default_value_t = 0)]
        frame: usize,
        /// Every frame (NPY only; PNG exports write FILE-N.png per frame).
        #[arg(long)]
        all_frames: bool,
    },
}

/// Run a DICOM command.
pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Info { file, json } => {
            if let Some(r) = dicom::results::read_report(&file)? {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", dicom::results::report_text(&file, &r));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let f = DicomFile::open(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&f.info)?);
            } else {
                print!("{}", dicom::info_text(&file, &f.info));
            }
        }
        Command::Export {
            file,
            output,
            voi,
            raw,
            frame,
            all_frames,
        } => {
            let voi = VoiChoice::parse(&voi)?;
            let frames = if all_frames { None } else { Some(frame) };
            let e = dicom::export(&file, &output, &voi, raw, frames)?;
            for s in &e.steps {
                eprintln!("  {s}");
            }
            for f in &e.files {
                eprintln!("wrote {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
