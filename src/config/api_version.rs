//! Which api-version each operation gets on an Azure upstream using the
//! deployments API, and which versions are known to be too old for it.

use crate::routes::Operation;

/// The latest dated GA version: the default for every upstream.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";
/// For operations that only preview versions serve (as of writing), when
/// the upstream's own version is a GA one or too old.
pub const DEFAULT_PREVIEW_API_VERSION: &str = "2025-04-01-preview";

/// The first version serving an operation (date part), and whether only
/// preview versions serve it.
fn first_version(op: Operation) -> (&'static str, bool) {
    match op {
        Operation::ChatCompletions => ("2023-03-15", false),
        Operation::Completions | Operation::Embeddings => ("2022-12-01", false),
        Operation::ImageGenerations => ("2023-12-01", false),
        Operation::AudioTranscriptions | Operation::AudioTranslations => ("2023-09-01", false),
        Operation::AudioSpeech => ("2024-02-15", true),
        Operation::ImageEdits => ("2025-04-01", true),
        Operation::Responses => ("2025-03-01", true),
    }
}

fn date(version: &str) -> &str {
    version.strip_suffix("-preview").unwrap_or(version)
}

/// `YYYY-MM-DD` or `YYYY-MM-DD-preview`.
pub fn is_dated(version: &str) -> bool {
    let date = date(version);
    date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        })
}

/// Is `version` known to be too old for `op`? Then it names the first one.
pub fn too_old(op: Operation, version: &str) -> Option<String> {
    let (first, preview_only) = first_version(op);
    (date(version) < first).then(|| {
        if preview_only {
            format!("{first}-preview")
        } else {
            first.to_string()
        }
    })
}

/// Whether a version takes `stream_options.include_usage` (first in
/// 2024-09-01-preview; older GA versions refuse it).
pub fn serves_include_usage(version: &str) -> bool {
    let first = "2024-09-01";
    date(version) > first || (date(version) == first && version.ends_with("-preview"))
}

/// The version an operation gets when `api_versions` does not name it:
/// the upstream's, if it serves the operation, else a default that does.
pub fn for_operation(op: Operation, upstream_version: &str) -> String {
    let (first, preview_only) = first_version(op);
    let serves = date(upstream_version) >= first
        && (!preview_only || upstream_version.ends_with("-preview"));
    if serves {
        upstream_version.to_string()
    } else if preview_only {
        DEFAULT_PREVIEW_API_VERSION.to_string()
    } else {
        DEFAULT_API_VERSION.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_needs_2024_09_01_preview() {
        for version in [
            "2024-09-01-preview",
            "2024-10-21",
            "2025-04-01-preview",
            "2025-01-01",
        ] {
            assert!(serves_include_usage(version), "{version}");
        }
        for version in [
            "2024-09-01",
            "2024-08-01-preview",
            "2024-06-01",
            "2023-05-15",
        ] {
            assert!(!serves_include_usage(version), "{version}");
        }
    }

    #[test]
    fn shapes() {
        assert!(is_dated("2024-10-21"));
        assert!(is_dated("2025-04-01-preview"));
        for bad in [
            "2024-10",
            "latest",
            "2024-10-21-beta",
            "24-10-2021",
            "v1",
            "preview",
        ] {
            assert!(!is_dated(bad), "{bad}");
        }
    }

    #[test]
    fn known_too_old() {
        assert_eq!(
            too_old(Operation::Responses, "2024-10-21"),
            Some("2025-03-01-preview".into())
        );
        assert_eq!(
            too_old(Operation::Responses, "2025-02-01-preview"),
            Some("2025-03-01-preview".into())
        );
        assert_eq!(too_old(Operation::Responses, "2025-03-01-preview"), None);
        assert_eq!(
            too_old(Operation::ImageEdits, "2025-03-01-preview"),
            Some("2025-04-01-preview".into())
        );
        assert_eq!(
            too_old(Operation::ChatCompletions, "2023-01-01"),
            Some("2023-03-15".into())
        );
        assert_eq!(too_old(Operation::ChatCompletions, "2024-10-21"), None);
        assert_eq!(
            too_old(Operation::AudioSpeech, "2024-02-01-preview"),
            Some("2024-02-15-preview".into())
        );
    }

    #[test]
    fn defaults_per_operation() {
        // A GA upstream version serves the GA operations...
        assert_eq!(
            for_operation(Operation::ChatCompletions, "2024-10-21"),
            "2024-10-21"
        );
        assert_eq!(
            for_operation(Operation::AudioTranscriptions, "2024-06-01"),
            "2024-06-01"
        );
        // ...the preview-only ones get a preview that serves them...
        assert_eq!(
            for_operation(Operation::Responses, "2024-10-21"),
            DEFAULT_PREVIEW_API_VERSION
        );
        assert_eq!(
            for_operation(Operation::ImageEdits, "2024-10-21"),
            DEFAULT_PREVIEW_API_VERSION
        );
        assert_eq!(
            for_operation(Operation::AudioSpeech, "2024-10-21"),
            DEFAULT_PREVIEW_API_VERSION
        );
        // ...a recent preview upstream version serves everything...
        for op in Operation::ALL {
            assert_eq!(
                for_operation(op, "2025-04-01-preview"),
                "2025-04-01-preview"
            );
        }
        // ...and a version too old for an operation is replaced.
        assert_eq!(
            for_operation(Operation::ImageGenerations, "2023-05-15"),
            DEFAULT_API_VERSION
        );
        assert_eq!(
            for_operation(Operation::Responses, "2025-01-01-preview"),
            DEFAULT_PREVIEW_API_VERSION
        );
    }
}
