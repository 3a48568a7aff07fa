//! The catalogue of malicious fixtures in `tests/data/`: the committed files are what the
//! generator makes, and the device's checks refuse each one with its own error.

use edgeloop_tests::fixtures::{Fixture, catalogue, check, data_dir, readme};

#[test]
fn the_committed_catalogue_is_what_the_generator_makes() {
    let dir = data_dir();
    let catalogue = catalogue();
    for Fixture { file, bytes, .. } in &catalogue {
        let committed = std::fs::read(dir.join(file)).unwrap_or_else(|e| {
            panic!("tests/data/{file}: {e}; run `cargo run -p edgeloop-tests --bin make-fixtures`")
        });
        assert!(
            committed == *bytes,
            "tests/data/{file} differs from what the generator makes; run \
             `cargo run -p edgeloop-tests --bin make-fixtures`"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("README.md")).unwrap(),
        readme(&catalogue)
    );
}

#[test]
fn every_fixture_is_refused_with_its_own_error() {
    let dir = data_dir();
    for Fixture {
        file, refused_with, ..
    } in catalogue()
    {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        match check(file, &bytes) {
            Ok(()) => assert!(refused_with.is_empty(), "{file} was accepted"),
            Err(e) => assert!(
                !refused_with.is_empty() && e.contains(refused_with),
                "{file}: refused with `{e}`, expected …{refused_with}…"
            ),
        }
    }
}

#[test]
fn the_catalogue_covers_each_kind_with_a_valid_example() {
    let catalogue = catalogue();
    let refused: Vec<&Fixture> = catalogue
        .iter()
        .filter(|f| !f.refused_with.is_empty())
        .collect();
    assert!(refused.len() >= 18, "{} malicious fixtures", refused.len());
    for kind in ["bundles/", "commands/", "trust/"] {
        assert!(
            catalogue
                .iter()
                .any(|f| f.file.starts_with(kind) && f.refused_with.is_empty()),
            "a valid example among the {kind}"
        );
    }
}
