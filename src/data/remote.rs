//! A file a dataset source downloads (`sdp data fetch`): where it comes from, its checksum, where it goes.

use std::path::{Path, PathBuf};

/// One file to download.
#[derive(Clone, Debug)]
pub struct RemoteFile {
    /// `http://` or `https://` URL; the last path segment is the local file name.
    pub url: String,
    /// Expected md5, lowercase hex.
    pub md5: String,
    /// Directory under the data directory where the file is stored (`""` for the data directory itself).
    pub dir: PathBuf,
    /// Files (relative to the data directory) a `.tar.gz` archive provides; empty means "do not extract".
    pub extracts: Vec<PathBuf>,
}

impl RemoteFile {
    /// Local file name: the URL's last path segment.
    pub fn file_name(&self) -> &str {
        self.url.rsplit('/').next().unwrap_or(&self.url)
    }

    /// Where the file is stored under `data_dir`.
    pub fn local_path(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.dir).join(self.file_name())
    }
}
