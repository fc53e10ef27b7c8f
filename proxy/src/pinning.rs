//! Which client messages leave state on a backend that another client must not inherit.
//!
//! In transaction mode a client that creates such state is pinned: it keeps its backend for
//! the rest of its session, and that backend is reset before anyone else gets it. The
//! classification is deliberately conservative: when in doubt, pin. Tracking and replaying
//! session state instead of pinning is layered on top of this (DESIGN §4).

/// Why a client was pinned; also the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    /// A session-level `SET`, `RESET` or `set_config(..., false)`.
    SessionSetting,
    /// SQL `PREPARE`.
    SqlPrepare,
    TempTable,
    AdvisoryLock,
    Listen,
    /// `DECLARE ... WITH HOLD`.
    HoldCursor,
    Load,
    /// A message too large for pgwarden to look inside.
    Uninspected,
}

impl PinReason {
    const ALL: [PinReason; 8] = [
        PinReason::SessionSetting,
        PinReason::SqlPrepare,
        PinReason::TempTable,
        PinReason::AdvisoryLock,
        PinReason::Listen,
        PinReason::HoldCursor,
        PinReason::Load,
        PinReason::Uninspected,
    ];

    /// The reason named `name` (its metric label), for the `pin_filters` setting.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::SessionSetting => "session_setting",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::TempTable => "temp_table",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::Listen => "listen",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::Load => "load",
            PinReason::Uninspected => "uninspected",
        }
    }
}

/// Words that may make SQL pin, in any case: as a statement's leading word, or as part of a
/// function or schema name (`advisory_lock`, `set_config`, `pg_temp`).
const PIN_WORDS: [&str; 8] = [
    "set",
    "reset",
    "prepare",
    "listen",
    "load",
    "temp",
    "temporary",
    "hold",
];
const PIN_WORD_PARTS: [&str; 3] = ["advisory_lock", "set_config", "pg_temp"];

/// The words of `sql`: its runs of ASCII letters, digits and `_`, as bytes. Quotes and
/// comments are not skipped, so a word inside them counts too (the scan errs towards looking
/// closer, never away). Every query is scanned, so this is a plain byte loop.
pub fn sql_words(sql: &str) -> SqlWords<'_> {
    SqlWords {
        bytes: sql.as_bytes(),
        at: 0,
    }
}

/// Iterator of [`sql_words`].
pub struct SqlWords<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for SqlWords<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let bytes = self.bytes;
        let mut at = self.at;
        while at < bytes.len() && !is_word_byte(bytes[at]) {
            at += 1;
        }
        let start = at;
        while at < bytes.len() && is_word_byte(bytes[at]) {
            at += 1;
        }
        self.at = at;
        (start < at).then(|| &bytes[start..at])
    }
}

fn is_word_byte(b: u8) -> bool {
    WORD_BYTES[b as usize]
}

/// `is_ascii_alphanumeric() || == b'_'` as a table: one load per byte.
static WORD_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric() || b as u8 == b'_';
        b += 1;
    }
    table
};

/// Whether `word` (from [`sql_words`]) is one the rules below could act on. Every word of
/// every query comes here, so most are turned away by a table lookup on their first byte
/// and length.
pub fn is_pin_word(word: &[u8]) -> bool {
    let Some(&first) = word.first() else {
        return false;
    };
    let lengths = PIN_WORD_LENGTHS[first as usize];
    (word.len() < 16
        && lengths & (1 << word.len()) != 0
        && PIN_WORDS
            .iter()
            .any(|w| w.len() == word.len() && word.eq_ignore_ascii_case(w.as_bytes())))
        || (word.len() >= SHORTEST_PART && holds_pin_word_part(word))
}

/// For each first byte (either case), the lengths of the [`PIN_WORDS`] it starts, as bits.
static PIN_WORD_LENGTHS: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < PIN_WORDS.len() {
        let word = PIN_WORDS[i].as_bytes();
        assert!(
            word.len() < 16,
            "a pin word's length must fit the table's bits"
        );
        let bit = 1 << word.len();
        table[word[0].to_ascii_lowercase() as usize] |= bit;
        table[word[0].to_ascii_uppercase() as usize] |= bit;
        i += 1;
    }
    table
};

/// The length of the shortest of [`PIN_WORD_PARTS`]: shorter words cannot hold one.
const SHORTEST_PART: usize = {
    let mut shortest = usize::MAX;
    let mut i = 0;
    while i < PIN_WORD_PARTS.len() {
        if PIN_WORD_PARTS[i].len() < shortest {
            shortest = PIN_WORD_PARTS[i].len();
        }
        i += 1;
    }
    shortest
};

/// Whether `word` holds one of [`PIN_WORD_PARTS`], in any case. Every part holds a `_`, so
/// only the places where `word` has one are tried (most words have none), and a place is
/// passed over unless the byte after its `_` is the part's.
fn holds_pin_word_part(word: &[u8]) -> bool {
    word.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'_')
        .any(|(at, _)| {
            PIN_WORD_PARTS.iter().any(|part| {
                let part = part.as_bytes();
                let offset = part.iter().position(|&b| b == b'_').unwrap_or(0);
                word.get(at + 1)
                    .is_some_and(|b| b.eq_ignore_ascii_case(&part[offset + 1]))
                    && at.checked_sub(offset).is_some_and(|start| {
                        word.get(start..start + part.len())
                            .is_some_and(|w| w.eq_ignore_ascii_case(part))
                    })
            })
        })
}

/// Whether `sql` holds a word the rules below could act on. Most SQL does not (a SELECT, an
/// INSERT, COMMIT): it is then classified without lower-casing or splitting it, which
/// every query would otherwise pay for.
fn may_pin(sql: &str) -> bool {
    sql_words(sql).any(is_pin_word)
}

/// `haystack.to_ascii_lowercase().contains(needle)` for a lower-case `needle`, without
/// the copy.
pub fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    haystack.len() >= needle.len()
        && (0..=haystack.len() - needle.len()).any(|at| {
            haystack[at].to_ascii_lowercase() == first
                && haystack[at + 1..at + needle.len()].eq_ignore_ascii_case(rest)
        })
}

/// Classifies the SQL of a simple Query (which may hold several statements) or of a Parse.
pub fn classify_sql(sql: &str) -> Option<PinReason> {
    if !may_pin(sql) {
        return None;
    }
    let lower = sql.to_ascii_lowercase();
    // Function calls can appear anywhere in a statement.
    if lower.contains("pg_advisory_lock")
        || lower.contains("pg_try_advisory_lock")
        || lower.contains("pg_advisory_lock_shared")
    {
        return Some(PinReason::AdvisoryLock);
    }
    if lower.contains("set_config") {
        return Some(PinReason::SessionSetting);
    }
    // `SELECT ... INTO TEMP t` and tables created in `pg_temp` directly.
    if lower.contains("pg_temp.") || lower.contains("into temp") {
        return Some(PinReason::TempTable);
    }
    let found = statements(&lower).into_iter().find_map(classify_statement);
    found
}

fn classify_statement(words: Vec<&str>) -> Option<PinReason> {
    match words.as_slice() {
        ["set", "local" | "transaction", ..] => None,
        ["set" | "reset", ..] => Some(PinReason::SessionSetting),
        ["prepare", "transaction", ..] => None,
        ["prepare", ..] => Some(PinReason::SqlPrepare),
        ["listen", ..] => Some(PinReason::Listen),
        ["load", ..] => Some(PinReason::Load),
        ["create", rest @ ..] if starts_temp(rest) => Some(PinReason::TempTable),
        ["declare", rest @ ..] if rest.windows(2).any(|w| w == ["with", "hold"]) => {
            Some(PinReason::HoldCursor)
        }
        _ => None,
    }
}

/// `CREATE [GLOBAL|LOCAL] {TEMP|TEMPORARY} ...` and `CREATE [OR REPLACE] TEMP VIEW`.
fn starts_temp(rest: &[&str]) -> bool {
    let rest = match rest {
        ["global" | "local", tail @ ..] => tail,
        ["or", "replace", tail @ ..] => tail,
        _ => rest,
    };
    matches!(rest.first(), Some(&"temp" | &"temporary"))
}

/// Splits lower-cased SQL into statements, each as its leading words (at most 16), skipping
/// comments and string literals so a `;` or keyword inside them is not misread.
fn statements(sql: &str) -> Vec<Vec<&str>> {
    fn flush_word<'a>(
        sql: &'a str,
        start: &mut Option<usize>,
        end: usize,
        current: &mut Vec<&'a str>,
    ) {
        if let Some(s) = start.take() {
            if current.len() < 16 {
                current.push(&sql[s..end]);
            }
        }
    }
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut word_start = None;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphanumeric() || c == b'_' {
            word_start.get_or_insert(i);
            i += 1;
            continue;
        }
        flush_word(sql, &mut word_start, i, &mut current);
        match c {
            b';' => out.push(std::mem::take(&mut current)),
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(bytes.len(), |n| i + n);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = sql[i + 2..]
                    .find("*/")
                    .map_or(bytes.len(), |n| i + 2 + n + 1);
            }
            b'\'' | b'"' => {
                i = sql[i + 1..]
                    .find(c as char)
                    .map_or(bytes.len(), |n| i + 1 + n);
                if current.len() < 16 {
                    current.push("<literal>");
                }
            }
            b'$' => {
                // Dollar quoting: $tag$ ... $tag$
                if let Some(len) = sql[i + 1..].find('$') {
                    let tag = &sql[i..i + len + 2];
                    if tag[1..tag.len() - 1]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        let body = i + tag.len();
                        i = sql[body..]
                            .find(tag)
                            .map_or(bytes.len(), |n| body + n + tag.len() - 1);
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    flush_word(sql, &mut word_start, bytes.len(), &mut current);
    out.push(current);
    out.retain(|s| !s.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_statements_do_not_pin() {
        for sql in [
            "select 1",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1",
            "BEGIN; SET LOCAL statement_timeout = 5; COMMIT",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "select 'set x = 1; listen y' as s",
            "-- set x\nselect 1",
            "/* listen a */ select 1",
            "select $$; prepare x as select 1$$",
            "select pg_advisory_xact_lock(1)",
            "PREPARE TRANSACTION 'x'",
            "create table t (temp int)",
            "",
        ] {
            assert_eq!(classify_sql(sql), None, "{sql}");
        }
    }

    #[test]
    fn session_state_pins_with_its_reason() {
        let cases = [
            ("SET search_path = app", PinReason::SessionSetting),
            ("  reset all", PinReason::SessionSetting),
            (
                "select 1; set statement_timeout = 10",
                PinReason::SessionSetting,
            ),
            (
                "SELECT set_config('a.b', 'c', false)",
                PinReason::SessionSetting,
            ),
            ("SET ROLE admin", PinReason::SessionSetting),
            ("PREPARE q AS SELECT 1", PinReason::SqlPrepare),
            ("CREATE TEMP TABLE t (a int)", PinReason::TempTable),
            (
                "create local temporary table t (a int)",
                PinReason::TempTable,
            ),
            (
                "create or replace temp view v as select 1",
                PinReason::TempTable,
            ),
            ("select pg_advisory_lock(42)", PinReason::AdvisoryLock),
            ("SELECT pg_try_advisory_lock(1)", PinReason::AdvisoryLock),
            ("LISTEN events", PinReason::Listen),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                PinReason::HoldCursor,
            ),
            ("LOAD 'auto_explain'", PinReason::Load),
            ("select 1 as a into temp t", PinReason::TempTable),
            ("create table pg_temp.t (a int)", PinReason::TempTable),
        ];
        for (sql, reason) in cases {
            assert_eq!(classify_sql(sql), Some(reason), "{sql}");
        }
    }

    #[test]
    fn sql_without_a_pin_word_is_not_inspected_and_sql_with_one_is() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "insert into t values (1, 'x')",
            "BEGIN",
            "COMMIT",
            "update t set_x = 1", // not the word SET
        ] {
            assert!(!may_pin(sql), "{sql}");
            assert_eq!(classify_sql(sql), None, "{sql}");
        }
        for sql in [
            "SeT search_path = x",
            "select PG_ADVISORY_LOCK(1)",
            "select pg_try_advisory_lock_shared(1)",
            "select Set_Config('a', 'b', false)",
            "create table PG_TEMP.t ()",
            "select 1 into TEMP t",
            "declare c cursor WITH HOLD for select 1",
            "LOAD 'auto_explain'",
        ] {
            assert!(may_pin(sql), "{sql}");
            assert!(classify_sql(sql).is_some(), "{sql}");
        }
        assert!(holds_pin_word_part(b"pg_try_ADVISORY_LOCK_shared"));
        assert!(holds_pin_word_part(b"pg_temp"));
        assert!(
            holds_pin_word_part(b"x_pg_temp_3"),
            "a second `_` holds the part"
        );
        assert!(!holds_pin_word_part(b"pg_tem"));
        assert!(!holds_pin_word_part(b"_set_confi"));
        assert!(!holds_pin_word_part(b"pgbench_accounts"));
        assert!(contains_ignore_ascii_case(b"xDeAlLoCaTe", b"deallocate"));
        assert!(contains_ignore_ascii_case(b"deallocate", b"deallocate"));
        assert!(!contains_ignore_ascii_case(b"deallo", b"deallocate"));
        assert!(!contains_ignore_ascii_case(b"xdeallocat", b"deallocate"));
    }

    #[test]
    fn every_pin_word_and_part_is_recognised_in_any_case() {
        for word in PIN_WORDS.iter().chain(&PIN_WORD_PARTS) {
            for case in [word.to_string(), word.to_uppercase()] {
                assert!(is_pin_word(case.as_bytes()), "{case}");
            }
        }
        assert!(is_pin_word(b"pg_try_advisory_lock"));
        // Near misses: the length and first letter of a pin word, its length and another first
        // letter, a part cut short or without its `_`.
        for word in [
            "sex",
            "xet",
            "Heed",
            "TEMPORARx",
            "",
            "pg",
            "pg_tem",
            "pgtemp",
            "setconfig",
        ] {
            assert!(!is_pin_word(word.as_bytes()), "{word}");
        }
    }

    #[test]
    fn words_are_runs_of_ascii_letters_digits_and_underscores() {
        let words: Vec<&[u8]> = sql_words("  SELECT é_x,pg_temp.t1;-- ").collect();
        assert_eq!(
            words,
            [&b"SELECT"[..], b"_x", b"pg_temp", b"t1"],
            "non-ASCII bytes and punctuation separate words"
        );
        assert_eq!(sql_words("").count(), 0);
        // `is_pin_word` only searches words holding a `_` for these.
        assert!(PIN_WORD_PARTS.iter().all(|part| part.contains('_')));
    }

    #[test]
    fn unterminated_quotes_and_comments_do_not_panic() {
        for sql in [
            "select 'abc",
            "select \"x",
            "/* never closed",
            "select $a$ x",
            "$",
            "$$",
        ] {
            let _ = classify_sql(sql);
        }
    }
}
