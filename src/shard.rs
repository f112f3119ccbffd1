//! Batch runs split over machines: `--shard K/N` takes the K-th of N contiguous parts of the
//! inputs (in the order one run would process them), picked up from Slurm job arrays and
//! Kubernetes Indexed Jobs; each part writes a manifest beside its outputs, and
//! [`crate::merge`] puts the parts back together as one run would have written them.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One part of a run split `count` ways (`index` from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This part, `0..count`.
    pub index: usize,
    /// Parts in all.
    pub count: usize,
}

impl Shard {
    /// Parse `K/N` (`0 <= K < N`).
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || Error::Invalid(format!("shard '{s}': expected K/N with 0 <= K < N"));
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The shard a scheduler assigns through the environment, and which one: a Slurm job
    /// array (`SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`, so
    /// `--array=1-3` works) or a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` of
    /// `EVAX_SHARD_COUNT`, which the manifest sets to its `completions`).
    pub fn from_env(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<(Shard, &'static str)>> {
        let num = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::Invalid(format!("environment variable {name}='{v}' is not a count"))
                }),
            }
        };
        if let (Some(id), Some(count)) =
            (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?)
        {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).filter(|&k| k < count).ok_or_else(|| {
                Error::Invalid(format!(
                    "Slurm array task {id} (min {min}) is not one of {count} tasks: use a \
                     contiguous --array range"
                ))
            })?;
            return Ok(Some((Shard { index, count }, "Slurm job array")));
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("EVAX_SHARD_COUNT")?.ok_or_else(|| {
                Error::Invalid(
                    "JOB_COMPLETION_INDEX is set but EVAX_SHARD_COUNT is not: set it to the \
                     Indexed Job's completions"
                        .into(),
                )
            })?;
            if count == 0 || index >= count {
                return Err(Error::Invalid(format!(
                    "JOB_COMPLETION_INDEX {index} is not below EVAX_SHARD_COUNT {count}"
                )));
            }
            return Ok(Some((Shard { index, count }, "Kubernetes Indexed Job")));
        }
        Ok(None)
    }

    /// `--shard` if given (`none`: the whole input even inside a job array), else the
    /// scheduler's; `None` for an undivided run.
    pub fn resolve(arg: Option<&str>) -> Result<Option<(Shard, &'static str)>> {
        match arg {
            Some(s) if s.trim().eq_ignore_ascii_case("none") => Ok(None),
            Some(s) => Ok(Some((Shard::parse(s)?, "--shard"))),
            None => Shard::from_env(&|k| std::env::var(k).ok()),
        }
    }

    /// The rows of `total` this shard takes: the `index`-th of `count` contiguous blocks
    /// (sizes differ by at most one).
    pub fn range(&self, total: usize) -> Range<usize> {
        let at = |k: usize| k * total / self.count;
        at(self.index)..at(self.index + 1)
    }
}

/// The inputs of a command over files (`predict`, `embed`, `cam`) after sharding, and where
/// they came from.
#[derive(Debug, Clone)]
pub struct Part {
    /// The shard, if the run is split.
    pub shard: Option<Shard>,
    /// The rows of all inputs this part takes.
    pub rows: Range<usize>,
    /// All inputs.
    pub total: usize,
}

impl Part {
    /// This shard's slice of `paths` (all of them when `shard` is `None`); `failures` (inputs
    /// that could not be listed) stay with the first part only.
    pub fn take(
        shard: Option<Shard>,
        paths: Vec<PathBuf>,
        failures: Vec<crate::infer::Failure>,
    ) -> (Vec<PathBuf>, Vec<crate::infer::Failure>, Part) {
        let total = paths.len();
        let rows = shard.map_or(0..total, |s| s.range(total));
        let failures = if shard.is_none_or(|s| s.index == 0) {
            failures
        } else {
            Vec::new()
        };
        let part = Part {
            shard,
            rows: rows.clone(),
            total,
        };
        (paths[rows].to_vec(), failures, part)
    }

    /// For a split run, write the manifest of `command` beside its output file (inside its
    /// output folder with `is_dir`).
    pub fn write_manifest(
        &self,
        command: &str,
        output: &Path,
        is_dir: bool,
        settings: serde_json::Value,
    ) -> Result<()> {
        let Some(shard) = self.shard else {
            return Ok(());
        };
        let m = Manifest {
            command: command.into(),
            shard,
            rows: [self.rows.start, self.rows.end],
            total: self.total,
            settings,
        };
        write_manifest(&manifest_path(output, is_dir), &m)
    }
}

/// What a shard's run writes beside its outputs, for `evax merge`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The command (`eval`, `predict`).
    pub command: String,
    /// Which part.
    pub shard: Shard,
    /// The rows of the whole input list this part took, `[start, end)`.
    pub rows: [usize; 2],
    /// Rows of the whole list.
    pub total: usize,
    /// Everything that must agree between the parts (checkpoint, list, settings).
    pub settings: serde_json::Value,
}

/// Where a shard's manifest lives: `shard.json` inside an output folder, `OUT.shard.json`
/// beside an output file.
pub fn manifest_path(output: &Path, is_dir: bool) -> PathBuf {
    if is_dir {
        output.join("shard.json")
    } else {
        let mut s = output.as_os_str().to_owned();
        s.push(".shard.json");
        PathBuf::from(s)
    }
}

/// Write a shard's manifest atomically.
pub fn write_manifest(path: &Path, m: &Manifest) -> Result<()> {
    crate::io::write_atomic(path, &serde_json::to_vec_pretty(m)?).map_err(|e| Error::io(path, e))
}

/// Read a shard's manifest.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: not a shard manifest: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_rows_in_order() {
        for total in [0, 1, 2, 7, 10, 1000] {
            for count in 1..6 {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard { index, count }.range(total);
                    assert_eq!(r.start, next, "total {total}, {index}/{count}");
                    assert!(r.len() <= total / count + 1);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
        assert_eq!(Shard::parse("2/3").unwrap(), Shard { index: 2, count: 3 });
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn schedulers_name_the_shard() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        // sbatch --array=1-3: tasks 1, 2, 3 are shards 0, 1, 2 of 3.
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        let (s, from) = Shard::from_env(&slurm).unwrap().unwrap();
        assert_eq!((s.index, s.count, from), (2, 3, "Slurm job array"));
        let k8s = env(&[("JOB_COMPLETION_INDEX", "0"), ("EVAX_SHARD_COUNT", "4")]);
        let (s, from) = Shard::from_env(&k8s).unwrap().unwrap();
        assert_eq!((s.index, s.count, from), (0, 4, "Kubernetes Indexed Job"));
        let e = Shard::from_env(&env(&[("JOB_COMPLETION_INDEX", "1")])).unwrap_err();
        assert!(e.to_string().contains("EVAX_SHARD_COUNT"), "{e}");
        let gap = env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert!(Shard::from_env(&gap).is_err());
        assert!(Shard::from_env(&env(&[])).unwrap().is_none());
        assert!(
            Shard::resolve(Some("none")).unwrap().is_none(),
            "opting out"
        );
    }

    #[test]
    fn manifests_sit_beside_files_and_inside_folders() {
        assert_eq!(
            manifest_path(Path::new("out/p.csv"), false),
            PathBuf::from("out/p.csv.shard.json")
        );
        assert_eq!(
            manifest_path(Path::new("out"), true),
            PathBuf::from("out/shard.json")
        );
    }
}
