//! Compiling the kernels with NVRTC at run time, for the arch of the GPU at hand.
//!
//! cudarc loads NVRTC by library *name* and panics when it cannot, and the dynamic loader
//! reads `LD_LIBRARY_PATH` only at process start. So before cudarc is touched we look for
//! `libnvrtc.so.13` in known directories and `dlopen` it by full path; cudarc's later
//! `dlopen("libnvrtc.so.13")` then finds the already loaded object by its soname. Absence
//! becomes [`Error::NvrtcMissing`], never a panic.
//!
//! NVRTC ships no CUDA headers, so the directory with `cuda_bf16.h` is passed as an include
//! path ([`Error::HeadersMissing`] when none is found).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::ptx_cache::{self, CacheOutcome};
use crate::{Error, Kernel, KernelFile};

/// CUDA major version of this build's cudarc bindings (feature `cuda-13000`).
pub const CUDA_MAJOR: i32 = 13;
const NVRTC_SONAME: &str = "libnvrtc.so.13";

/// Env var: directory holding `libnvrtc.so.13`.
pub const ENV_NVRTC_LIB_DIR: &str = "ALLAM_NVRTC_LIB_DIR";
/// Env var: CUDA include directory (holding `cuda_bf16.h`); several may be `:`-separated.
pub const ENV_CUDA_INCLUDE_DIR: &str = "ALLAM_CUDA_INCLUDE_DIR";
/// Env var: PTX cache directory; empty or `off` disables the cache.
pub const ENV_PTX_CACHE_DIR: &str = "ALLAM_PTX_CACHE_DIR";
/// Env var: root of scripts/install-nvrtc.sh's installs (default `$HOME/.cache/allam-serve`).
pub const ENV_ALLAM_CACHE: &str = "ALLAM_CACHE";

/// Where NVRTC, the headers and the PTX cache are. `None`/empty fields are searched for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvrtcConfig {
    /// Directory holding `libnvrtc.so.13`; when set, only it is tried.
    pub lib_dir: Option<PathBuf>,
    /// `--include-path` directories; when non-empty, only they are used.
    pub include_dirs: Vec<PathBuf>,
    /// PTX cache directory; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
}

impl NvrtcConfig {
    /// Reads [`ENV_NVRTC_LIB_DIR`], [`ENV_CUDA_INCLUDE_DIR`] and [`ENV_PTX_CACHE_DIR`]; the
    /// cache defaults to `$XDG_CACHE_HOME/allam/ptx` (or `$HOME/.cache/allam/ptx`).
    pub fn from_env() -> NvrtcConfig {
        let lib_dir = env_path(ENV_NVRTC_LIB_DIR);
        let include_dirs = std::env::var_os(ENV_CUDA_INCLUDE_DIR)
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let cache_dir = match std::env::var(ENV_PTX_CACHE_DIR) {
            Ok(v) if v.is_empty() || v == "off" => None,
            Ok(v) => Some(PathBuf::from(v)),
            Err(_) => default_ptx_cache_dir(),
        };
        NvrtcConfig {
            lib_dir,
            include_dirs,
            cache_dir,
        }
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn default_ptx_cache_dir() -> Option<PathBuf> {
    let base = env_path("XDG_CACHE_HOME").or_else(|| env_path("HOME").map(|h| h.join(".cache")))?;
    Some(base.join("allam").join("ptx"))
}

/// `${ALLAM_CACHE:-$HOME/.cache/allam-serve}/cuda/13.0/nvidia/cu13`: where
/// scripts/install-nvrtc.sh puts the PyPI wheels.
pub fn default_install_root() -> Option<PathBuf> {
    let base = env_path(ENV_ALLAM_CACHE)
        .or_else(|| env_path("HOME").map(|h| h.join(".cache").join("allam-serve")))?;
    Some(base.join("cuda").join("13.0").join("nvidia").join("cu13"))
}

/// CUDA toolkit roots worth trying when nothing is configured.
fn toolkit_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env_path(v))
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots.push(PathBuf::from("/usr/local/cuda-13.0"));
    roots
}

fn lib_dir_candidates(cfg: &NvrtcConfig) -> Vec<PathBuf> {
    if let Some(d) = &cfg.lib_dir {
        return vec![d.clone()];
    }
    let mut dirs = Vec::new();
    dirs.extend(default_install_root().map(|r| r.join("lib")));
    for root in toolkit_roots() {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("lib"));
    }
    dirs
}

fn include_dir_candidates(cfg: &NvrtcConfig) -> Vec<PathBuf> {
    if !cfg.include_dirs.is_empty() {
        return cfg.include_dirs.clone();
    }
    let mut dirs = Vec::new();
    dirs.extend(default_install_root().map(|r| r.join("include")));
    dirs.extend(toolkit_roots().into_iter().map(|r| r.join("include")));
    dirs
}

/// The include directories to pass to NVRTC: the configured/searched ones that hold
/// `cuda_bf16.h` (the header chain it pulls in lives beside it).
pub fn find_include_dirs(cfg: &NvrtcConfig) -> Result<Vec<PathBuf>, Error> {
    let candidates = include_dir_candidates(cfg);
    let found: Vec<PathBuf> = candidates
        .iter()
        .filter(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .collect();
    if found.is_empty() {
        return Err(Error::HeadersMissing {
            searched: describe(&candidates),
        });
    }
    if cfg.include_dirs.is_empty() {
        // Searched: the first hit only, so two toolkits' headers never mix.
        Ok(found.into_iter().take(1).collect())
    } else {
        Ok(cfg.include_dirs.clone())
    }
}

fn describe(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no candidate directories ($HOME unset)".to_owned();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The NVRTC that compiles for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvrtcInfo {
    /// Full path it was loaded from, or the soname when the system loader found it.
    pub path: String,
    pub major: i32,
    pub minor: i32,
}

// The library loaded first stays loaded for the life of the process (cudarc caches its
// handle), so later calls with another config get the same answer.
static LOADED: OnceLock<Result<NvrtcInfo, String>> = OnceLock::new();

/// Loads NVRTC (once per process) and checks its version.
pub fn load_nvrtc(cfg: &NvrtcConfig) -> Result<NvrtcInfo, Error> {
    let candidates = lib_dir_candidates(cfg);
    let outcome = LOADED.get_or_init(|| load_uncached(&candidates));
    match outcome {
        Ok(info) if info.major != CUDA_MAJOR => Err(Error::NvrtcVersion {
            path: info.path.clone(),
            found_major: info.major,
            found_minor: info.minor,
            needed_major: CUDA_MAJOR,
        }),
        Ok(info) => Ok(info.clone()),
        Err(searched) => Err(Error::NvrtcMissing {
            searched: searched.clone(),
        }),
    }
}

fn load_uncached(candidates: &[PathBuf]) -> Result<NvrtcInfo, String> {
    let mut path = None;
    for dir in candidates {
        let file = dir.join(NVRTC_SONAME);
        if !file.is_file() {
            continue;
        }
        // NVRTC dlopens its builtins library by soname at compile time; without the directory
        // on LD_LIBRARY_PATH that fails, so it is preloaded by full path as well.
        for builtins in builtins_libraries(dir) {
            // SAFETY: as below; a failure here resurfaces as NVRTC's own clear error.
            if let Ok(lib) = unsafe { libloading::Library::new(&builtins) } {
                std::mem::forget(lib);
            }
        }
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions; the
        // handle is leaked on purpose so the object stays mapped for cudarc, which resolves
        // the same soname later.
        if let Ok(lib) = unsafe { libloading::Library::new(&file) } {
            std::mem::forget(lib);
            path = Some(file.display().to_string());
            break;
        }
    }
    // SAFETY: is_culib_present only dlopens candidate names and closes them again.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let mut searched = describe(candidates);
        searched.push_str(", and the system library path");
        return Err(searched);
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is present (checked above), so cudarc's loader cannot panic;
    // nvrtcVersion only writes the two ints.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!(
            "{} (nvrtcVersion failed: {status:?})",
            path.unwrap_or_default()
        ));
    }
    Ok(NvrtcInfo {
        path: path.unwrap_or_else(|| NVRTC_SONAME.to_owned()),
        major,
        minor,
    })
}

/// `libnvrtc-builtins.so.13*` files in `dir` (not the `.alt.` variants NVRTC picks itself).
fn builtins_libraries(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("libnvrtc-builtins.so.{CUDA_MAJOR}");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    found.sort();
    found
}

/// NVRTC's name for an arch: `sm_90` / `compute_90` / `90` -> `compute_90` (PTX for the
/// virtual arch; the driver JITs it for the device). Only 80 and newer: the kernels use
/// bf16 arithmetic that needs sm_80.
pub fn normalize_arch(arch: &str) -> Result<String, Error> {
    let digits = arch
        .trim_start_matches("sm_")
        .trim_start_matches("compute_");
    let bad = || Error::UnsupportedArch {
        arch: arch.to_owned(),
    };
    // `90a`-style suffixes select arch-specific features we do not use; PTX for the plain
    // arch runs there too.
    let number: String = digits.chars().take_while(|c| c.is_ascii_digit()).collect();
    if number.is_empty() || digits.len() - number.len() > 1 {
        return Err(bad());
    }
    let value: u32 = number.parse().map_err(|_| bad())?;
    if value < 80 {
        return Err(bad());
    }
    Ok(format!("compute_{value}"))
}

/// The arch string of a compute capability, e.g. (9, 0) -> `sm_90`.
pub fn arch_of_compute_capability(major: u32, minor: u32) -> String {
    format!("sm_{major}{minor}")
}

/// PTX of one kernel file.
#[derive(Debug, Clone)]
pub struct CompiledFile {
    pub file: KernelFile,
    /// NVRTC arch it was compiled for (`compute_90`).
    pub arch: String,
    pub ptx: String,
    pub cache: CacheOutcome,
}

impl CompiledFile {
    /// Whether the PTX defines `kernel` as an entry point.
    pub fn has_entry(&self, kernel: Kernel) -> bool {
        ptx_has_entry(&self.ptx, kernel.symbol())
    }
}

pub(crate) fn ptx_has_entry(ptx: &str, symbol: &str) -> bool {
    ptx.lines().any(|l| {
        let l = l.trim_start();
        l.contains(".entry ")
            && l.split(".entry ").nth(1).is_some_and(|rest| {
                rest.starts_with(symbol) && rest[symbol.len()..].starts_with('(')
            })
    })
}

fn compile_options(arch: &str, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_owned(),
    ];
    opts.extend(
        include_dirs
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    opts
}

/// Compiles every kernel file for `arch` (`sm_90`, `sm_80`, ...), using the PTX cache when
/// `cfg.cache_dir` is set. Files are compiled in parallel. Every entry point of the kernel
/// table is checked to be in its file's PTX.
pub fn compile_ptx(arch: &str, cfg: &NvrtcConfig) -> Result<Vec<CompiledFile>, Error> {
    let arch = normalize_arch(arch)?;
    let include_dirs = find_include_dirs(cfg)?;
    // The include path is part of the key: another toolkit's headers may compile differently.
    let options = compile_options(&arch, &include_dirs);

    let mut done: Vec<Option<CompiledFile>> = vec![None; KernelFile::ALL.len()];
    let mut to_compile = Vec::new();
    for (i, file) in KernelFile::ALL.into_iter().enumerate() {
        let source = file.compile_source();
        let cached_path = cfg.cache_dir.as_ref().map(|dir| {
            let key = ptx_cache::cache_key(&source, &arch, &options);
            ptx_cache::entry_path(dir, file, &arch, &key)
        });
        let hit = cached_path.as_deref().and_then(ptx_cache::load);
        match hit {
            Some(ptx)
                if file
                    .kernels()
                    .iter()
                    .all(|k| ptx_has_entry(&ptx, k.symbol())) =>
            {
                done[i] = Some(CompiledFile {
                    file,
                    arch: arch.clone(),
                    ptx,
                    cache: CacheOutcome::Hit,
                });
            }
            _ => to_compile.push((i, file, source, cached_path)),
        }
    }

    if !to_compile.is_empty() {
        load_nvrtc(cfg)?;
        let results: Vec<(usize, Result<CompiledFile, Error>)> = std::thread::scope(|s| {
            let handles: Vec<_> = to_compile
                .iter()
                .map(|(i, file, source, cached_path)| {
                    let (arch, options) = (&arch, &options);
                    let handle = s.spawn(move || {
                        compile_one(*file, source, arch, options, cached_path.as_deref())
                    });
                    (*i, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| {
                    let r = h.join().unwrap_or_else(|_| {
                        Err(Error::Compile {
                            file: KernelFile::ALL[i].file_name(),
                            arch: arch.clone(),
                            log: "the compiler thread panicked".to_owned(),
                        })
                    });
                    (i, r)
                })
                .collect()
        });
        for (i, r) in results {
            done[i] = Some(r?);
        }
    }
    Ok(done.into_iter().flatten().collect())
}

fn compile_one(
    file: KernelFile,
    source: &str,
    arch: &str,
    options: &[String],
    cached_path: Option<&Path>,
) -> Result<CompiledFile, Error> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: options.to_vec(),
        name: Some(file.file_name().to_owned()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| Error::Compile {
            file: file.file_name(),
            arch: arch.to_owned(),
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            },
        })?
        .to_src();
    for k in file.kernels() {
        if !ptx_has_entry(&ptx, k.symbol()) {
            return Err(Error::MissingEntry {
                file: file.file_name(),
                arch: arch.to_owned(),
                symbol: k.symbol(),
            });
        }
    }
    let cache = match cached_path {
        None => CacheOutcome::Disabled,
        Some(path) => match ptx_cache::store(path, &ptx) {
            Ok(()) => CacheOutcome::Stored,
            Err(msg) => CacheOutcome::StoreFailed(msg),
        },
    };
    Ok(CompiledFile {
        file,
        arch: arch.to_owned(),
        ptx,
        cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(normalize_arch("sm_90").ok().as_deref(), Some("compute_90"));
        assert_eq!(normalize_arch("sm_80").ok().as_deref(), Some("compute_80"));
        assert_eq!(
            normalize_arch("compute_89").ok().as_deref(),
            Some("compute_89")
        );
        assert_eq!(normalize_arch("sm_90a").ok().as_deref(), Some("compute_90"));
        assert_eq!(normalize_arch("100").ok().as_deref(), Some("compute_100"));
        for bad in ["sm_75", "sm_", "gfx90a", "sm_9x0", ""] {
            assert!(
                matches!(normalize_arch(bad), Err(Error::UnsupportedArch { .. })),
                "{bad}"
            );
        }
        assert_eq!(arch_of_compute_capability(9, 0), "sm_90");
    }

    #[test]
    fn entry_detection_needs_the_exact_symbol() {
        let ptx = ".visible .entry rmsnorm_bf16(\n.param .u64 a\n)\n.visible .entry fused_add_rmsnorm_bf16(\n";
        assert!(ptx_has_entry(ptx, "rmsnorm_bf16"));
        assert!(ptx_has_entry(ptx, "fused_add_rmsnorm_bf16"));
        assert!(!ptx_has_entry(ptx, "rmsnorm"));
        assert!(!ptx_has_entry(ptx, "add_rmsnorm_bf16"));
    }

    #[test]
    fn missing_headers_name_the_searched_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = NvrtcConfig {
            include_dirs: vec![dir.path().to_path_buf()],
            ..Default::default()
        };
        let err = find_include_dirs(&cfg).expect_err("no cuda_bf16.h there");
        let msg = err.to_string();
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("scripts/install-nvrtc.sh"), "{msg}");
        std::fs::write(dir.path().join("cuda_bf16.h"), "").expect("write");
        assert_eq!(
            find_include_dirs(&cfg).expect("found"),
            vec![dir.path().to_path_buf()]
        );
    }

    #[test]
    fn builtins_are_found_beside_nvrtc_but_not_the_alt_variant() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "libnvrtc.so.13",
            "libnvrtc-builtins.so.13.0",
            "libnvrtc-builtins.alt.so.13.0",
        ] {
            std::fs::write(dir.path().join(name), "").expect("write");
        }
        assert_eq!(
            builtins_libraries(dir.path()),
            vec![dir.path().join("libnvrtc-builtins.so.13.0")]
        );
        assert!(builtins_libraries(&dir.path().join("absent")).is_empty());
    }

    #[test]
    fn compile_options_carry_arch_and_includes() {
        let o = compile_options("compute_90", &[PathBuf::from("/x/include")]);
        assert!(o.contains(&"--gpu-architecture=compute_90".to_owned()));
        assert!(o.contains(&"--include-path=/x/include".to_owned()));
    }
}
