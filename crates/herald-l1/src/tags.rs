//! What tags mean, in one place: the tags an event drops, and the tags an
//! entry is indexed under besides the ones it was given.
//!
//! Tags come in three kinds:
//!
//! | tag | who carries it | dropped by |
//! |---|---|---|
//! | `res_users` (table tag) | entries that depend on the table as a whole (lists, counts) | every event of the table |
//! | `res_users.website_slug=alice` (row tag) | entries that depend on rows with that value | events touching such a row |
//! | `res_users.*` (any-row tag) | **implied** by every row tag of the table | table-wide events only |
//!
//! A *table-wide* event (a TRUNCATE, or an event capture widened because it
//! was too large to list its rows) cannot name the rows it touched, so it
//! must drop every entry that depends on any row of the table, whatever tags
//! its resource declared. That is what the any-row tag is for: nobody
//! declares it; [`indexed_tags`] adds it to every entry that has a row tag of
//! the table (in L1, in L2 and in any near cache), and [`event_tags`] adds it
//! to every table-wide event. Ordinary events do not carry it, so a change
//! of one row still drops only that row's entries.

use herald_proto::v1::{InvalidationEvent, Operation};

use crate::scope::{TagKey, validate_identifier};

/// The any-row tag of `table`: held by every entry with a row tag of it.
pub fn any_row(table: &str) -> String {
    format!("{table}.*")
}

/// The table a row tag (`<table>.<column>=<value>`) belongs to, if `tag` is
/// one. Self tags (`@…`), table tags and application tags are not.
pub fn row_tag_table(tag: &str) -> Option<&str> {
    let (name, _value) = tag.split_once('=')?;
    let (table, column) = name.split_once('.')?;
    (validate_identifier(table).is_ok() && validate_identifier(column).is_ok()).then_some(table)
}

/// `tags` plus the any-row tag of every table one of them is a row tag of:
/// what an entry is indexed under. Order is kept; nothing is repeated.
pub fn indexed_tags(mut tags: Vec<TagKey>) -> Vec<TagKey> {
    let mut implied: Vec<TagKey> = Vec::new();
    for tag in &tags {
        if let Some(table) = row_tag_table(&tag.tag) {
            let any = TagKey::new(tag.scope.clone(), any_row(table));
            if !implied.contains(&any) && !tags.contains(&any) {
                implied.push(any);
            }
        }
    }
    tags.extend(implied);
    tags
}

/// Whether `event` concerns every row of its table (it names no rows).
pub fn is_table_wide(event: &InvalidationEvent) -> bool {
    event.widened || event.operation() == Operation::Truncate
}

/// The tags `event` drops: its own, plus its table's any-row tag when it is
/// table-wide.
pub fn event_tags(event: &InvalidationEvent) -> Vec<String> {
    let mut tags = event.tags.clone();
    if is_table_wide(event) && !event.table.is_empty() {
        let any = any_row(&event.table);
        if !tags.contains(&any) {
            tags.push(any);
        }
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::{Scope, TenantId};

    #[test]
    fn row_tags_name_their_table_and_nothing_else_does() {
        assert_eq!(row_tag_table("res_users.website_slug=alice"), Some("res_users"));
        assert_eq!(row_tag_table("res_users.id=a=b.c"), Some("res_users"));
        for not_row in ["res_users", "res_users.*", "@user_by_slug:p:a.b=c", "team:5", "a.B=1", "=x", "x.=1"] {
            assert_eq!(row_tag_table(not_row), None, "{not_row}");
        }
    }

    #[test]
    fn entries_are_indexed_under_each_tables_any_row_tag_once() {
        let acme = Scope::Tenant(TenantId::new("acme").unwrap());
        let tag = |t: &str| TagKey::new(acme.clone(), t);
        let given = vec![tag("res_users.website_slug=a"), tag("res_users.id=1"), tag("@user_by_slug:p:a"), tag("x")];
        let indexed = indexed_tags(given.clone());
        assert_eq!(indexed[..4], given[..]);
        assert_eq!(indexed[4..], [tag("res_users.*")]);
        assert_eq!(indexed_tags(vec![tag("team_list")]), [tag("team_list")]);
    }

    #[test]
    fn only_table_wide_events_drop_the_any_row_tag() {
        let update = InvalidationEvent {
            table: "res_users".into(),
            operation: Operation::Update as i32,
            tags: vec!["res_users".into(), "res_users.id=1".into()],
            ..Default::default()
        };
        assert_eq!(event_tags(&update), update.tags);
        let widened = InvalidationEvent { widened: true, tags: vec!["res_users".into()], ..update.clone() };
        assert_eq!(event_tags(&widened), ["res_users", "res_users.*"]);
        let truncate =
            InvalidationEvent { operation: Operation::Truncate as i32, tags: vec!["res_users".into()], ..update };
        assert!(is_table_wide(&truncate));
        assert_eq!(event_tags(&truncate), ["res_users", "res_users.*"]);
    }
}
