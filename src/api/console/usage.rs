//! The Usage page: operations per client per day (the admin API's usage counts), with a small
//! bar chart of the daily totals drawn here as SVG.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::overview::unavailable;
use super::{ConsoleError, Officer, date, respond};
use crate::api::AppState;
use crate::api::usage::{self, UsageQuery};
use crate::auth::unix_now;

const DAY: i64 = 86_400;

/// `GET /console/usage` query.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct UsagePageQuery {
    /// Days back, 1 to 366 (14).
    days: Option<u32>,
}

/// Usage.
#[utoipa::path(get, path = "/console/usage", tag = "console", params(UsagePageQuery),
    security(("console_session" = [])),
    responses(
        (status = 200, description = "The usage page", content_type = "text/html"),
        (status = 303, description = "Not signed in: to the sign-in page"),
    ))]
pub(super) async fn page(
    State(state): State<AppState>,
    officer: Officer,
    query: Result<Query<UsagePageQuery>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let days = query.ok().and_then(|Query(q)| q.days).unwrap_or(14);
    let usage = usage::admin_usage(
        State(state.clone()),
        officer.caller.clone(),
        Ok(Query(UsageQuery {
            days: Some(days),
            key_id: None,
            client_id: None,
        })),
    )
    .await
    .map(|Json(body)| body);
    let content = html! {
        section.card {
            form.filters method="get" action="/console/usage" {
                label { "Days back" input type="number" name="days" min="1" max="366" value=(days); }
                button.secondary type="submit" { "Show" }
            }
            @match &usage {
                Ok(body) => {
                    @let per_client_day = per_client_day(&body.items);
                    @let today = unix_now().div_euclid(DAY) * DAY;
                    @let totals = daily_totals(&per_client_day, today, days);
                    h2 { "Operations per day, every client" }
                    (chart(&totals))
                    h2 { "Operations per client per day" }
                    @if per_client_day.is_empty() {
                        p.muted { "No operations in this period." }
                    } @else {
                        table #usage {
                            tr { th { "Day" } th { "Client" } th.num { "Operations" } th { "By kind" } }
                            @for ((day, client), (total, kinds)) in per_client_day.iter().rev() {
                                tr {
                                    td.mono { (date(*day)) } td.mono { (client) } td.num { (total) }
                                    td { @for (kind, n) in kinds { span.mono { (kind) ": " (n) } " " } }
                                }
                            }
                        }
                    }
                },
                Err(e) => (unavailable(e)),
            }
        }
    };
    Ok(respond(&officer, "Usage", "/console/usage", None, content))
}

/// Per (day, client): the total, and the counts per operation.
type PerClientDay = BTreeMap<(i64, Uuid), (i64, BTreeMap<String, i64>)>;

fn per_client_day(items: &[usage::UsageItem]) -> PerClientDay {
    let mut out = PerClientDay::new();
    for item in items {
        let entry = out.entry((item.day, item.client_id)).or_default();
        entry.0 += item.count;
        *entry.1.entry(item.operation.clone()).or_default() += item.count;
    }
    out
}

/// Each of the last `days` days (oldest first, ending with `today`), with its total.
fn daily_totals(per_client_day: &PerClientDay, today: i64, days: u32) -> Vec<(i64, i64)> {
    let first = today - (i64::from(days) - 1) * DAY;
    (0..i64::from(days))
        .map(|i| {
            let day = first + i * DAY;
            let total = per_client_day
                .iter()
                .filter(|((d, _), _)| *d == day)
                .map(|(_, (n, _))| n)
                .sum();
            (day, total)
        })
        .collect()
}

/// A bar per day, scaled to the busiest; each bar's title gives the date and the count.
fn chart(totals: &[(i64, i64)]) -> Markup {
    const WIDTH: i64 = 720;
    const HEIGHT: i64 = 160;
    const BASE: i64 = 140;
    let max = totals.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let slot = WIDTH / i64::try_from(totals.len().max(1)).unwrap_or(1);
    let bar = (slot * 3 / 4).max(1);
    html! {
        svg.chart #usage-chart xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
            viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label="Operations per day" {
            line.axis x1="0" y1=(BASE) x2=(WIDTH) y2=(BASE) {}
            @for (i, (day, n)) in totals.iter().enumerate() {
                @let x = i64::try_from(i).unwrap_or(0) * slot + (slot - bar) / 2;
                @let h = n * (BASE - 10) / max;
                rect.bar x=(x) y=(BASE - h) width=(bar) height=(h) {
                    title { (date(*day)) ": " (n) " operations" }
                }
                @if totals.len() <= 31 && (i % 2 == 0 || totals.len() <= 14) {
                    text x=(x) y=(HEIGHT - 4) { (&date(*day)[5..]) }
                }
            }
            text x="4" y="12" { "max " (max) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_cover_every_day_even_without_operations() {
        let mut per = PerClientDay::new();
        per.insert((10 * DAY, Uuid::nil()), (3, BTreeMap::new()));
        per.insert((10 * DAY, Uuid::max()), (4, BTreeMap::new()));
        let totals = daily_totals(&per, 11 * DAY, 3);
        assert_eq!(totals, vec![(9 * DAY, 0), (10 * DAY, 7), (11 * DAY, 0)]);
        let svg = chart(&totals).into_string();
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("operations</title>"));
    }
}
