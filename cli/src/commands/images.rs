//! `sandbox pull | images | rmi | prune`: the OCI image cache from the command line.

use std::process::ExitCode;

use crate::exit::Outcome;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand};
use sandbox::rootfs::{ImageSource, PullOptions};

/// Default bound of the image cache (`SANDBOX_IMAGE_CACHE_MAX` overrides it).
const DEFAULT_CACHE_MAX: u64 = 20 << 30;

#[derive(Debug, Subcommand)]
pub(crate) enum ImagesCommand {
    /// Pull an OCI image and convert it for sandboxes (registry reference, oci:<dir>[:tag], docker-archive:<file>).
    Pull(PullArgs),
    /// List the cached images.
    Images,
    /// Remove cached images (by reference or digest).
    Rmi {
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
    /// Shrink the image cache to a size, least recently used images first.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    image: String,
}

#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
    /// Keep at most this much (e.g. 10G, 500M); default $SANDBOX_IMAGE_CACHE_MAX or 20G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
    /// Remove every cached image.
    #[arg(long, conflicts_with = "max_size")]
    all: bool,
}

/// The bound the cache is kept under after each pull.
fn cache_max() -> anyhow::Result<u64> {
    match std::env::var("SANDBOX_IMAGE_CACHE_MAX") {
        Ok(v) => parse_size(&v).map_err(|e| anyhow::anyhow!("SANDBOX_IMAGE_CACHE_MAX: {e}")),
        Err(_) => Ok(DEFAULT_CACHE_MAX),
    }
}

fn pull_options(progress: bool) -> anyhow::Result<PullOptions> {
    Ok(PullOptions { progress, max_cache_bytes: Some(cache_max()?), ..PullOptions::default() })
}

pub(crate) fn images(cmd: ImagesCommand) -> Outcome {
    let store = sandbox::image_store();
    match cmd {
        ImagesCommand::Pull(args) => {
            let source = ImageSource::parse(&args.image)?;
            let (rec, path) = store.pull(&source, &pull_options(true)?)?;
            eprintln!("sandbox: {} is {} ({}, {})", source, rec.digest, human(rec.size), path.display());
            println!("{}", rec.digest);
        }
        ImagesCommand::Images => {
            let now = now();
            println!("{:<60} {:<19} {:>9}  LAST USED", "REFERENCE", "DIGEST", "SIZE");
            for rec in store.list()? {
                let short = rec.digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
                let name = rec.references.first().map_or("<none>", String::as_str);
                let ago = now.saturating_sub(rec.last_used);
                println!("{name:<60} sha256:{short:<12} {:>9}  {}", human(rec.size), ago_text(ago));
            }
        }
        ImagesCommand::Rmi { images } => {
            for image in images {
                for rec in store.remove(&image)? {
                    println!("removed {} ({})", rec.digest, rec.references.join(", "));
                }
            }
        }
        ImagesCommand::Prune(args) => {
            let max = if args.all { 0 } else { args.max_size.map_or_else(cache_max, Ok)? };
            let removed = store.prune(max).context("pruning the image cache")?;
            let freed: u64 = removed.iter().map(|r| r.size).sum();
            for rec in &removed {
                println!("removed {} ({})", rec.digest, rec.references.join(", "));
            }
            eprintln!("sandbox: freed {}; the cache holds {}", human(freed), human(store.size()?));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Before `run`: pull an OCI image that is not cached, with progress bars.
pub(crate) fn prepare(image: &sandbox::Image) -> anyhow::Result<()> {
    if let sandbox::Image::Oci(name) = image {
        let source = ImageSource::parse(name)?;
        sandbox::image_store().ensure(&source, &pull_options(true)?)?;
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown unit in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size too large: {s:?}"))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn ago_text(secs: u64) -> String {
    match secs {
        0..60 => "just now".into(),
        60..3600 => format!("{} minutes ago", secs / 60),
        3600..86400 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("1X").is_err() && parse_size("").is_err() && parse_size("99999999999T").is_err());
        assert_eq!(human(1536), "1.5 KiB");
    }
}
