//! `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not know it reads
//! them: without this, a changed migration leaves a binary with the old ones.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
