//! Writes the catalogue of malicious fixtures to `tests/data/` (see `fixtures`).

fn main() -> std::io::Result<()> {
    let dir = edgeloop_tests::fixtures::data_dir();
    edgeloop_tests::fixtures::write_all(&dir)?;
    println!("wrote the fixture catalogue to {}", dir.display());
    Ok(())
}
