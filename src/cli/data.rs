//! `evax data`: check, prepare and describe dataset folders.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use evax::data::{self, DatasetKind, LoadOptions, Split, chexpert::UncertaintyPolicy};

/// Which split of which dataset.
#[derive(clap::Args, Clone)]
pub struct DataArgs {
    /// Dataset: cxr14, chexpert, covidx3 or covidx4.
    #[arg(long)]
    dataset: String,
    /// The dataset's folder (images anywhere below it; lists and CSVs at its top).
    #[arg(long)]
    data_dir: PathBuf,
    /// List / CSV file (default: the split's usual file in the data folder).
    #[arg(long)]
    list: Option<PathBuf>,
    /// Split (default: test for cxr14 and covidx3, valid for chexpert, val for covidx4).
    #[arg(long)]
    split: Option<String>,
    /// CheXpert uncertain labels: original (U-Ones for Edema and Atelectasis, U-Zeros for the
    /// rest), ones, zeros or ignore.
    #[arg(long, default_value = "original")]
    uncertainty: String,
    /// ChestX-ray14 Data_Entry_2017*.csv[.gz] for name-only lists (default: found in the data folder).
    #[arg(long)]
    data_entry: Option<PathBuf>,
    /// Missing images and malformed rows are errors.
    #[arg(long)]
    strict: bool,
}

impl DataArgs {
    /// Read the split, printing what had to be skipped.
    pub fn load(&self) -> anyhow::Result<Split> {
        let kind = DatasetKind::parse(&self.dataset)?;
        let opts = LoadOptions {
            policy: UncertaintyPolicy::parse(&self.uncertainty)?,
            data_entry: self.data_entry.clone(),
            strict: self.strict,
        };
        let split = self.split.as_deref().unwrap_or(kind.default_eval_split());
        let s = data::load_split(kind, &self.data_dir, split, self.list.as_deref(), &opts)?;
        data::split_warnings(&s, 10)
            .iter()
            .for_each(|w| eprintln!("{w}"));
        if s.samples.is_empty() {
            anyhow::bail!("{}: no usable images", s.list.display());
        }
        Ok(s)
    }
}

/// Dataset tools: check a layout, prepare it, label statistics.
#[derive(Subcommand)]
pub enum Command {
    /// Verify a dataset folder: lists, counts the original checks, missing and extra images,
    /// ChestX-ray14 labels against Data_Entry.
    Check {
        /// Dataset.
        #[arg(long)]
        dataset: String,
        /// The dataset's folder.
        #[arg(long)]
        data_dir: PathBuf,
        /// ChestX-ray14 Data_Entry_2017*.csv[.gz] (default: found in the data folder).
        #[arg(long)]
        data_entry: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prepare a dataset as the original does, by linking: ChestX-ray14's images_001..012/images
    /// into one folder.
    Prepare {
        /// Dataset.
        #[arg(long)]
        dataset: String,
        /// The downloaded dataset.
        #[arg(long)]
        data_dir: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Label prevalence per class of a split.
    Stats {
        #[command(flatten)]
        data: DataArgs,
    },
}

/// Run a data command; `check` exits 1 when the folder is not as the original expects.
pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Check {
            dataset,
            data_dir,
            data_entry,
            json,
        } => {
            let kind = DatasetKind::parse(&dataset)?;
            let opts = LoadOptions {
                data_entry,
                ..Default::default()
            };
            let r = data::check::check(kind, &data_dir, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", data::check::render_text(&r));
            }
            Ok(if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Prepare {
            dataset,
            data_dir,
            output,
        } => {
            match DatasetKind::parse(&dataset)? {
                DatasetKind::Cxr14 => {
                    let n = data::check::prepare_cxr14(&data_dir, &output)?;
                    eprintln!("linked {n} images into {}", output.join("images").display());
                }
                k => eprintln!(
                    "{}: nothing to prepare; evax reads the downloaded layout directly",
                    k.name()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { data } => {
            print!("{}", data::stats_text(&data.load()?));
            Ok(ExitCode::SUCCESS)
        }
    }
}
