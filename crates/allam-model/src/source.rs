//! Where weights come from: the `WeightSource` trait and its safetensors implementation
//! (one `model.safetensors`, or shards listed by `model.safetensors.index.json`), memory
//! mapped so a tensor's bytes are read straight from the page cache.
//!
//! Tensor parallelism reads only a rank's slice: column-parallel weights (q/k/v, gate/up,
//! embedding, lm_head) are row ranges of `[out, in]` tensors, served by
//! [`WeightSource::read_rows`] without copying the rest. Row-parallel weights (o_proj,
//! down_proj) are column ranges, served by [`WeightSource::read_cols`], which copies just the
//! slice out of each row.
//!
//! Invariant: a `SafetensorsSource` only exists if every shard's header parsed and its
//! declared tensors exactly cover the file, so every later slice is in bounds.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use allam_backend::DType;
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use crate::Error;

/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a multi-file checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A tensor's dtype and shape, and the file holding it (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

/// Named tensors, row-major little-endian bytes.
pub trait WeightSource: Send + Sync {
    /// What to name in messages: the checkpoint directory, or a dummy description.
    fn location(&self) -> &Path;

    /// Dtype, shape and file of `name`; [`Error::MissingTensor`] when absent.
    fn meta(&self, name: &str) -> Result<TensorMeta, Error>;

    /// All bytes of `name`.
    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>, Error>;

    /// Bytes of rows `rows` of `name` along its first dimension (a 1-D tensor's rows are its
    /// elements). Borrowed when the source is memory mapped.
    fn read_rows(&self, name: &str, rows: Range<usize>) -> Result<Cow<'_, [u8]>, Error> {
        let meta = self.meta(name)?;
        let total_rows = meta.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > total_rows {
            return Err(Error::RowRange {
                tensor: name.to_owned(),
                path: meta.file,
                start: rows.start,
                end: rows.end,
                rows: total_rows,
            });
        }
        let row_bytes = meta.shape.iter().skip(1).product::<usize>() * meta.dtype.size_in_bytes();
        let range = rows.start * row_bytes..rows.end * row_bytes;
        Ok(match self.read(name)? {
            Cow::Borrowed(all) => Cow::Borrowed(&all[range]),
            Cow::Owned(all) => Cow::Owned(all[range].to_vec()),
        })
    }

    /// Bytes of columns `cols` of the 2-D tensor `name`, row-major `[rows, cols.len()]`.
    /// Borrowed when the range is every column of a memory-mapped tensor; otherwise only the
    /// slice is copied.
    fn read_cols(&self, name: &str, cols: Range<usize>) -> Result<Cow<'_, [u8]>, Error> {
        let meta = self.meta(name)?;
        let bad = || Error::ColumnRange {
            tensor: name.to_owned(),
            path: meta.file.clone(),
            start: cols.start,
            end: cols.end,
            shape: meta.shape.clone(),
        };
        let [rows, total_cols] = meta.shape[..] else {
            return Err(bad());
        };
        if cols.start > cols.end || cols.end > total_cols {
            return Err(bad());
        }
        let all = self.read(name)?;
        if cols.start == 0 && cols.end == total_cols {
            return Ok(all);
        }
        let elem = meta.dtype.size_in_bytes();
        let row_bytes = total_cols * elem;
        let mut out = Vec::with_capacity(rows * cols.len() * elem);
        for row in all.chunks_exact(row_bytes) {
            out.extend_from_slice(&row[cols.start * elem..cols.end * elem]);
        }
        Ok(Cow::Owned(out))
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + header).
    data_start: usize,
    metadata: Metadata,
}

/// A safetensors checkpoint directory, memory mapped.
pub struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index in `shards`.
    tensor_shard: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens `dir/model.safetensors.index.json` and its shards if the index exists, else
    /// `dir/model.safetensors`. Every shard header is parsed and checked now.
    pub fn open(dir: &Path) -> Result<SafetensorsSource, Error> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index_path.clone(),
                source,
            })?;
            let weight_map = value
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::Index {
                    path: index_path.clone(),
                    detail: "missing object field `weight_map`".to_owned(),
                })?;
            let mut file_index: HashMap<&str, usize> = HashMap::new();
            let mut shards = Vec::new();
            let mut tensor_shard = HashMap::new();
            // Sorted so shards open (and fail) in a stable order.
            let mut entries: Vec<(&String, &Value)> = weight_map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (tensor, file) in entries {
                let file = file.as_str().ok_or_else(|| Error::Index {
                    path: index_path.clone(),
                    detail: format!("`weight_map.{tensor}` is not a file name"),
                })?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::Index {
                        path: index_path.clone(),
                        detail: format!(
                            "`weight_map.{tensor}` = {file:?} leaves the model directory"
                        ),
                    });
                }
                let idx = match file_index.get(file) {
                    Some(idx) => *idx,
                    None => {
                        shards.push(open_shard(&dir.join(file))?);
                        file_index.insert(file, shards.len() - 1);
                        shards.len() - 1
                    }
                };
                tensor_shard.insert(tensor.clone(), idx);
            }
            Ok(SafetensorsSource {
                dir: dir.to_path_buf(),
                shards,
                tensor_shard,
            })
        } else if single_path.is_file() {
            let shard = open_shard(&single_path)?;
            let tensor_shard = shard
                .metadata
                .tensors()
                .into_keys()
                .map(|name| (name, 0))
                .collect();
            Ok(SafetensorsSource {
                dir: dir.to_path_buf(),
                shards: vec![shard],
                tensor_shard,
            })
        } else {
            Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// Names of every tensor in the checkpoint, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensor_shard.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn locate(&self, name: &str) -> Result<(&Shard, &safetensors::tensor::TensorInfo), Error> {
        let shard = self
            .tensor_shard
            .get(name)
            .map(|idx| &self.shards[*idx])
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_owned(),
                path: self.dir.clone(),
            })?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_owned(),
                path: shard.path.clone(),
            })?;
        Ok((shard, info))
    }
}

impl WeightSource for SafetensorsSource {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn meta(&self, name: &str) -> Result<TensorMeta, Error> {
        let (shard, info) = self.locate(name)?;
        let dtype = match info.dtype {
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            StDtype::F32 => DType::F32,
            other => {
                return Err(Error::TensorDType {
                    tensor: name.to_owned(),
                    path: shard.path.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(TensorMeta {
            dtype,
            shape: info.shape.clone(),
            file: shard.path.clone(),
        })
    }

    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>, Error> {
        let (shard, info) = self.locate(name)?;
        let (start, end) = info.data_offsets;
        // In bounds: `read_metadata` checked that the offsets tile the data section exactly.
        Ok(Cow::Borrowed(
            &shard.mmap[shard.data_start + start..shard.data_start + end],
        ))
    }
}

fn open_shard(path: &Path) -> Result<Shard, Error> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only and the mapping is never written. Another process
    // truncating or rewriting the checkpoint while it is mapped would be undefined behaviour;
    // like every safetensors loader we accept that (checkpoints are immutable in practice).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            detail: describe_header_error(&mmap, e),
        })?;
    Ok(Shard {
        path: path.to_path_buf(),
        data_start: 8 + header_len,
        mmap,
        metadata,
    })
}

/// Turns the crate's terse "incomplete metadata" into which tensor runs past the end.
fn describe_header_error(bytes: &[u8], err: SafeTensorError) -> String {
    if !matches!(err, SafeTensorError::MetadataIncompleteBuffer) {
        return err.to_string();
    }
    let header_len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize);
    let header: Option<serde_json::Map<String, Value>> = header_len
        .and_then(|n| bytes.get(8..8 + n))
        .and_then(|h| serde_json::from_slice(h).ok());
    let (Some(header_len), Some(header)) = (header_len, header) else {
        return err.to_string();
    };
    let data_len = bytes.len() - 8 - header_len;
    let mut ends: Vec<(usize, &str)> = header
        .iter()
        .filter_map(|(name, info)| {
            let end = info.get("data_offsets")?.get(1)?.as_u64()? as usize;
            Some((end, name.as_str()))
        })
        .collect();
    ends.sort_unstable();
    match ends.iter().find(|(end, _)| *end > data_len) {
        Some((end, name)) => format!(
            "truncated: tensor `{name}` ends at data byte {end}, the file has only {data_len} data bytes"
        ),
        None => format!(
            "tensors cover {} data bytes but the file has {data_len} (trailing bytes)",
            ends.last().map_or(0, |(end, _)| *end)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One 3x4 bf16-sized tensor `t` whose bytes count up, plus a 1-D `v`.
    struct Mem;

    impl WeightSource for Mem {
        fn location(&self) -> &Path {
            Path::new("<mem>")
        }
        fn meta(&self, name: &str) -> Result<TensorMeta, Error> {
            let shape = match name {
                "t" => vec![3, 4],
                "v" => vec![5],
                _ => {
                    return Err(Error::MissingTensor {
                        tensor: name.to_owned(),
                        path: PathBuf::from("<mem>"),
                    })
                }
            };
            Ok(TensorMeta {
                dtype: DType::BF16,
                shape,
                file: PathBuf::from("<mem>"),
            })
        }
        fn read(&self, name: &str) -> Result<Cow<'_, [u8]>, Error> {
            let numel: usize = self.meta(name)?.shape.iter().product();
            Ok(Cow::Owned((0..2 * numel as u8).collect()))
        }
    }

    #[test]
    fn column_slices_take_the_same_columns_of_every_row() {
        // Element (r, c) is bytes [2 * (4r + c), 2 * (4r + c) + 1].
        let got = Mem.read_cols("t", 1..3).expect("cols");
        let want: Vec<u8> = (0..3u8)
            .flat_map(|r| (1..3u8).flat_map(move |c| [2 * (4 * r + c), 2 * (4 * r + c) + 1]))
            .collect();
        assert_eq!(got.as_ref(), want.as_slice());
        assert_eq!(
            Mem.read_cols("t", 0..4).expect("all").as_ref(),
            Mem.read("t").expect("all").as_ref()
        );
        assert_eq!(
            Mem.read_rows("t", 2..3).expect("row").as_ref(),
            &[16, 17, 18, 19, 20, 21, 22, 23]
        );
        for (name, cols) in [("t", 2..5), ("v", 0..1)] {
            let err = Mem
                .read_cols(name, cols)
                .expect_err("bad range")
                .to_string();
            assert!(err.contains(&format!("`{name}`")), "{err}");
        }
    }
}
