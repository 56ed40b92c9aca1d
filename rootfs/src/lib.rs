//! Guest root images from OCI images.
//!
//! An image is named like Docker names it (`python:3.12-slim`,
//! `registry:5000/team/app@sha256:…`), or as a local OCI layout directory
//! (`oci:<dir>[:tag]`) or a `docker save` archive (`docker-archive:<file>`).
//! [`Store::pull`] fetches its manifest, config and layers (every blob checked
//! against its digest), applies the layers in order (whiteouts, opaque
//! directories, owners, modes, links, device nodes, xattrs) and writes one
//! uncompressed read-only erofs image, cached by manifest digest and shared by
//! every sandbox that boots it.
//!
//! Layers are hostile input: paths that leave the tree, writes through
//! symlinks, hard links to outside, duplicates, absurd sizes and counts, and
//! digest mismatches are errors; an image becomes visible in the cache only
//! once it is complete (written under `tmp/`, then renamed).

mod config;
mod convert;
mod digest;
mod error;
mod local;
mod manifest;
mod registry;
mod source;
mod store;

#[cfg(feature = "fixtures")]
pub mod fixtures;

pub use config::ImageConfig;
pub use convert::Limits;
pub use digest::Digest;
pub use error::Error;
pub use source::ImageSource;
pub use store::{ImageRecord, PullOptions, Store};
