//! The library's one error type: every public operation returns [`Result`], with the error of
//! the part that failed kept as the source.

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::dicom::DicomError;
use crate::model::ModelError;
use crate::preprocess::ImageError;

/// Why an evax operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Weights do not build a model, or an input does not fit it.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A dataset's lists or layout are unusable.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A DICOM file could not be read.
    #[error(transparent)]
    Dicom(#[from] DicomError),
    /// An image could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Output could not be encoded.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A setting, argument or file content is not acceptable (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// An error with what was being done when it happened.
    #[error("{context}: {source}")]
    Context {
        /// What was being done (usually a file name).
        context: String,
        /// The error.
        source: Box<Error>,
    },
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Invalid(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error::Invalid(s.to_string())
    }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// This error with `context` (a file, a step) in front.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Error::Context {
            context: context.to_string(),
            source: Box::new(self),
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `.context(...)` on any result whose error converts into [`Error`].
pub trait ResultExt<T> {
    /// Put `context` in front of the error.
    fn context(self, context: impl std::fmt::Display) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }
}
