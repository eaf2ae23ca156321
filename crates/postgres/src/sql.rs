//! Quoting for the SQL walcast builds (names from the configuration).

use walcast_core::config::TableName;

/// Quotes an SQL identifier (doubling embedded quotes).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (doubling embedded quotes).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A table name quoted for SQL: `"schema"."table"`.
pub fn quote_table(t: &TableName) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_literals_are_quoted() {
        assert_eq!(
            quote_table(&TableName::parse("my\"s.o").unwrap()),
            "\"my\"\"s\".\"o\""
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
