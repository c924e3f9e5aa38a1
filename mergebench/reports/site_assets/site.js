// Sorting and filtering of the leaderboard's tables: no dependencies, works on pages opened from the file system.
// A cell's data-value is what sorting compares (a number; empty for a missing value, always sorted last);
// a cell without one is compared by its text.
"use strict";

function sortKey(row, column) {
  const cell = row.cells[column];
  if (cell.dataset.value === undefined) return cell.textContent.trim().toLowerCase();
  return cell.dataset.value === "" ? null : Number(cell.dataset.value);
}

function sortTable(table, column, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = sortKey(a, column), y = sortKey(b, column);
    if (x === y) return 0;
    if (x === null) return 1;
    if (y === null) return -1;
    return (x < y ? -1 : 1) * (descending ? -1 : 1);
  });
  rows.forEach((row) => body.appendChild(row));
  Array.from(table.tHead.rows[0].cells).forEach((header, index) => {
    if (index === column) header.setAttribute("aria-sort", descending ? "descending" : "ascending");
    else header.removeAttribute("aria-sort");
  });
}

function applyFilters(table) {
  const controls = document.querySelectorAll(`[data-filter="${table.id}"]`);
  let shown = 0;
  Array.from(table.tBodies[0].rows).forEach((row) => {
    const visible = Array.from(controls).every((control) => {
      const wanted = control.value.trim().toLowerCase();
      if (!wanted) return true;
      if (control.dataset.column === undefined) return row.textContent.toLowerCase().includes(wanted);
      return row.cells[Number(control.dataset.column)].textContent.trim().toLowerCase() === wanted;
    });
    row.hidden = !visible;
    shown += visible ? 1 : 0;
  });
  const count = document.querySelector(`[data-count="${table.id}"]`);
  if (count) count.textContent = `${shown} of ${table.tBodies[0].rows.length} rows`;
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.sortable").forEach((table) => {
    Array.from(table.tHead.rows[0].cells).forEach((header, column) => {
      header.tabIndex = 0;
      header.title = "sort by this column";
      const sort = () => sortTable(table, column, header.getAttribute("aria-sort") === "ascending");
      header.addEventListener("click", sort);
      header.addEventListener("keydown", (event) => { if (event.key === "Enter") sort(); });
    });
    applyFilters(table);
  });
  document.querySelectorAll("[data-filter]").forEach((control) => {
    const table = document.getElementById(control.dataset.filter);
    control.addEventListener("input", () => applyFilters(table));
    control.addEventListener("change", () => applyFilters(table));
  });
});
