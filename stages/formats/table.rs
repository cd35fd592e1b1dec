//! A table written as one parquet file: the training record (`metrics.parquet`) and `eval`'s
//! results (`results.parquet`) both go through here, zstd-compressed, one row group.

use std::path::Path;

use anyhow::Context as _;
use arrow_array::{ArrayRef, RecordBatch};
use parquet::arrow::ArrowWriter;

/// Writes `columns` (name, values, nullable) as the table at `path`.
pub fn write(path: &Path, columns: Vec<(&str, ArrayRef, bool)>) -> anyhow::Result<()> {
    let batch = RecordBatch::try_from_iter_with_nullable(columns)?;
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    super::replace(path, |temporary| {
        let file = fs_err::File::create(temporary)?;
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties))?;
        writer.write(&batch).with_context(|| format!("could not write `{}`", path.display()))?;
        writer.close().with_context(|| format!("could not write `{}`", path.display()))?;
        Ok(())
    })
}
