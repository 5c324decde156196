//! Checks of the text fields of requests, made before any reaches PostgreSQL, which refuses a
//! NUL byte in text (and would answer with an error that is not the client's to read).

/// Checks an identifier-like field (an id, a SKU, a token): at most `max_chars` characters and
/// no control characters. The error says what is wrong, for a message that names the field.
pub fn identifier(value: &str, max_chars: usize) -> Result<(), String> {
    check(value, max_chars, |_| false)
}

/// Checks free text (a reason): at most `max_chars` characters, and no control characters but
/// line breaks and tabs.
pub fn free_text(value: &str, max_chars: usize) -> Result<(), String> {
    check(value, max_chars, |c| matches!(c, '\n' | '\r' | '\t'))
}

fn check(value: &str, max_chars: usize, allowed: impl Fn(char) -> bool) -> Result<(), String> {
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(format!(
            "must be at most {max_chars} characters, got {chars}"
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && !allowed(*c)) {
        return Err(format!(
            "must not contain control characters, found U+{:04X}",
            u32::from(c)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_and_control_characters_and_overlong_values_are_refused() {
        assert!(identifier("SKU-MOUSE", 64).is_ok());
        assert!(identifier("", 64).is_ok());
        assert_eq!(
            identifier("SKU\u{0}X", 64).unwrap_err(),
            "must not contain control characters, found U+0000"
        );
        assert!(identifier("a\nb", 64).is_err());
        assert!(identifier("é".repeat(64).as_str(), 64).is_ok());
        assert_eq!(
            identifier(&"x".repeat(65), 64).unwrap_err(),
            "must be at most 64 characters, got 65"
        );
        assert!(free_text("two\nlines\tand a tab", 100).is_ok());
        assert!(free_text("nul\u{0}", 100).is_err());
        assert!(free_text("bell\u{7}", 100).is_err());
    }
}
