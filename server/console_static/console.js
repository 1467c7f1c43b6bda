// The bitseg console: one page over the HTTP JSON API (POST /api/v1/METHOD, the gRPC
// methods with protobuf's JSON forms). No framework and no build step: plain DOM calls,
// and charts drawn as SVG by the functions at the end of this file.
"use strict";

// ------------------------------------------------------------------ helpers
const NUMBER = new Intl.NumberFormat("en-US");
const fmt = (n) => NUMBER.format(Number(n));
const SVG_NS = "http://www.w3.org/2000/svg";

function h(tag, attrs, ...children) {
  const el = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "value" && !tag.startsWith("svg:")) el.value = value;
    else if (key === "checked") el.checked = true;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function select(attrs, options, chosen) {
  return h("select", attrs, options.map(([value, label]) =>
    h("option", { value, selected: value === chosen }, label)));
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, body) {
  const headers = { "Content-Type": "application/json" };
  const token = document.getElementById("token").value.trim();
  if (token) headers.Authorization = "Bearer " + token;
  const answer = await fetch("/api/v1/" + method, {
    method: "POST", headers, body: JSON.stringify(body || {}) });
  const data = await answer.json();
  if (!answer.ok) throw new ApiError(answer.status, data.code, data.message);
  return data;
}

function showProblem(error) {
  const box = document.getElementById("problem");
  if (!error) { box.hidden = true; return; }
  box.hidden = false;
  box.textContent = error.status === 401
    ? "The server asks for a token: enter it at the top right. (" + error.message + ")"
    : error.message;
}

// The JSON path an error message names ("invalid rule: $.and[1].op: ..."), or null.
function errorPath(message) {
  const found = /(\$(?:\.[A-Za-z_]\w*|\[\d+\])*)/.exec(message || "");
  return found ? found[1] : null;
}

const KIND_NAMES = { SEGMENT_KIND_STATIC: "static", SEGMENT_KIND_DYNAMIC: "dynamic",
                     SEGMENT_KIND_MATERIALIZED: "materialized" };

// ------------------------------------------------------------------ the data's shape
let described = null;
async function describe() {
  if (!described) described = await api("Describe", { top: 20 });
  return described;
}

const OPS = {
  keyword: ["eq", "ne", "in", "not_in", "exists", "not_exists"],
  keywords: ["eq", "ne", "in", "not_in", "has_all", "exists", "not_exists"],
  int: ["eq", "ne", "gt", "gte", "lt", "lte", "between", "in", "not_in", "exists", "not_exists"],
  float: ["eq", "ne", "gt", "gte", "lt", "lte", "between", "exists", "not_exists"],
  date: ["eq", "gt", "gte", "lt", "lte", "between", "anniversary_in", "exists", "not_exists"],
  timestamp: ["gt", "gte", "lt", "lte", "between", "exists", "not_exists"],
  bool: ["eq", "ne", "exists", "not_exists"],
};
const OP_WORDS = { eq: "is", ne: "is not", in: "is any of", not_in: "is none of",
  has_all: "has all of", gt: ">", gte: "≥", lt: "<", lte: "≤", between: "between",
  exists: "has a value", not_exists: "has no value", anniversary_in: "anniversary in (days)" };
const LIST_OPS = new Set(["in", "not_in", "has_all", "between"]);
const COMPARE = [["gte", "at least"], ["gt", "more than"], ["eq", "exactly"],
                 ["lte", "at most"], ["lt", "fewer than"]];

// A value as typed, in the field's type: "a, b" is a list for list ops; text that
// starts with { or [ is JSON ({"days_ago": 30}).
function parseValue(text, type, op) {
  text = (text || "").trim();
  if (op === "exists" || op === "not_exists") return undefined;
  if (text.startsWith("{") || text.startsWith("[")) {
    try { return JSON.parse(text); } catch (e) { throw new Error("value: " + e.message); }
  }
  if (op === "anniversary_in") return { next_days: parseScalar(text, "int") };
  if (LIST_OPS.has(op)) {
    const parts = text.split(",").map((p) => p.trim()).filter((p) => p !== "");
    if (!parts.length) throw new Error("value: enter one or more values, comma-separated");
    return parts.map((p) => parseScalar(p, type));
  }
  return parseScalar(text, type);
}

function parseScalar(text, type) {
  if (text === "") throw new Error("value: enter a value");
  if (type === "int" || type === "float") {
    const n = Number(text);
    if (Number.isNaN(n)) throw new Error(`value: expected a number, got "${text}"`);
    return n;
  }
  if (type === "bool") {
    if (text === "true" || text === "false") return text === "true";
    throw new Error(`value: expected true or false, got "${text}"`);
  }
  return text;
}

// ------------------------------------------------------------------ the builder's tree
// A node is a group {type: "group", op: "and"|"or", children}, a condition
// {type: "cond", kind: "field"|"event"|"orders", ...} or a raw JSON node {type: "json",
// text}; any node may carry not: true. Its rule is built by toRule, which records the
// JSON path of every node, so an error that names a path is shown at its node.
let nextId = 1;
const newGroup = (op) => ({ id: nextId++, type: "group", op: op || "and", not: false,
                            children: [] });
const newCond = () => ({ id: nextId++, type: "cond", kind: "field", not: false, field: "",
                         op: "", value: "", event: "", prop: "", propOp: "", propValue: "",
                         times: "1", compare: "gte",
                         days: "", agg: "count", of: "" });
const newJson = (text) => ({ id: nextId++, type: "json", not: false,
                             text: text || '{"field": "", "op": "eq", "value": ""}' });

class NodeError extends Error {
  constructor(node, message) { super(message); this.node = node; }
}

function toRule(node, path, paths) {
  paths.push([path, node]);
  const inner = node.not ? path + ".not" : path;
  let rule;
  if (node.type === "group") {
    rule = { [node.op]: node.children.map((child, i) =>
      toRule(child, `${inner}.${node.op}[${i}]`, paths)) };
  } else if (node.type === "json") {
    try { rule = JSON.parse(node.text); } catch (e) { throw new NodeError(node, e.message); }
  } else {
    try { rule = condRule(node); } catch (e) { throw new NodeError(node, e.message); }
  }
  return node.not ? { not: rule } : rule;
}

function fieldType(name, fields) {
  const found = fields.find((f) => f.name === name);
  return found ? found.type : "keyword";
}

function condRule(node) {
  const d = described;
  if (node.kind === "field") {
    if (!node.field) throw new Error("pick a field");
    const type = fieldType(node.field, d.fields);
    const op = node.op || OPS[type][0];
    const value = parseValue(node.value, type, op);
    return value === undefined ? { field: node.field, op } : { field: node.field, op, value };
  }
  const having = { agg: node.agg || "count" };
  if (having.agg !== "count") {
    if (!node.of) throw new Error("pick the field to " + having.agg);
    having.of = node.of;
  }
  having.op = node.compare;
  having.value = parseScalar((node.times || "").trim(), "float");
  const rule = {};
  if (node.kind === "event") {
    if (!node.event) throw new Error("pick an event type");
    rule.event = node.event;
    const info = d.events.find((e) => e.name === node.event);
    if (node.prop && info) {
      const type = fieldType(node.prop, info.properties);
      const op = node.propOp || OPS[type][0];
      const value = parseValue(node.propValue, type, op);
      rule.where = value === undefined ? { field: node.prop, op } : { field: node.prop, op, value };
    }
  } else {
    const fields = [...d.order_fields, ...d.item_fields];
    if (!node.field) rule.orders = { all: true };
    else {
      const type = fieldType(node.field, fields);
      const op = node.op || OPS[type][0];
      const value = parseValue(node.value, type, op);
      rule.orders = value === undefined ? { field: node.field, op }
        : { field: node.field, op, value };
    }
  }
  if ((node.days || "").trim()) rule.window = { last_days: parseScalar(node.days.trim(), "int") };
  rule.having = having;
  return rule;
}

// The whole rule: an empty root is everyone.
function builderRule(root) {
  const paths = [];
  if (root.type === "group" && !root.children.length && !root.not) {
    return { rule: { all: true }, paths: [["$", root]] };
  }
  return { rule: toRule(root, "$", paths), paths };
}

// The node an error's path names: the deepest one whose path starts it.
function nodeOfPath(paths, path) {
  let best = null;
  for (const [p, node] of paths) {
    if (path === p || path.startsWith(p + ".") || path.startsWith(p + "[")) {
      if (!best || p.length > best[0].length) best = [p, node];
    }
  }
  return best ? best[1] : paths.length ? paths[0][1] : null;
}

// ------------------------------------------------------------------ the builder page
const builder = { root: newGroup("and"), timer: null, asked: 0 };

let templates = [];

async function pageBuilder(main) {
  if (!described) main.append(h("p", { class: "muted" }, "Reading what the data holds…"));
  await describe();
  templates = (await api("ListTemplates", {})).templates;
  if (!main.isConnected) return; // the address changed meanwhile
  main.replaceChildren();
  main.append(
    h("h1", {}, "Segment builder"),
    h("div", { class: "card" },
      h("div", { class: "live", "data-testid": "count" }, "…"),
      h("div", { class: "muted" }, "profiles match, of ", fmt(described.profiles)),
      h("div", { class: "summary", "data-testid": "summary" })),
    h("div", { class: "card", id: "tree" }),
    h("div", { class: "card" },
      h("h2", {}, "Save as a segment"),
      h("div", { class: "row" },
        h("input", { id: "save-name", placeholder: "name", "aria-label": "segment name" }),
        select({ id: "save-kind", "aria-label": "kind" }, [["SEGMENT_KIND_DYNAMIC", "dynamic"],
          ["SEGMENT_KIND_MATERIALIZED", "materialized"], ["SEGMENT_KIND_STATIC", "static"]]),
        h("input", { id: "save-tags", placeholder: "tags, comma-separated",
                     "aria-label": "tags" }),
        h("button", { id: "save", onclick: saveSegment }, "Save"),
        h("span", { id: "save-result", class: "muted" })),
      h("div", { class: "row" }, "rule:", select({ id: "save-template", "aria-label":
        "template", onchange: showTemplate }, [["", "the builder's rule"],
        ...templates.map((t) => [t.name, "template " + t.name])])),
      h("div", { id: "template-params", class: "row" })),
    h("div", { class: "card" },
      h("h2", {}, "The rule as JSON"),
      h("textarea", { id: "rule-json", "aria-label": "rule as JSON", rows: 6 }),
      h("div", { class: "row" },
        h("button", { id: "load-json", onclick: loadJson }, "Load this JSON into the builder"),
        h("span", { id: "load-json-error", class: "node-error", hidden: true }))));
  renderTree();
}

function renderTree() {
  const tree = document.getElementById("tree");
  if (!tree) return;
  tree.replaceChildren(renderNode(builder.root, null));
  scheduleCount();
}

function changed() { scheduleCount(); }

function renderNode(node, parent) {
  const remove = parent && h("button", { class: "remove", title: "remove",
    onclick: () => { parent.children.splice(parent.children.indexOf(node), 1); renderTree(); } },
  "×");
  const not = h("label", {}, h("input", { type: "checkbox", class: "not", checked: node.not,
    onchange: (e) => { node.not = e.target.checked; changed(); } }), " NOT");
  const badge = h("span", { class: "badge node-count" });
  const error = h("div", { class: "node-error", hidden: true });
  let body;
  if (node.type === "group") {
    body = [
      h("div", { class: "row" },
        select({ class: "group-op", "aria-label": "and / or", onchange: (e) => {
          node.op = e.target.value; renderTree(); } },
        [["and", "ALL of (AND)"], ["or", "ANY of (OR)"]], node.op),
        not,
        h("button", { class: "add-cond", onclick: () => {
          node.children.push(newCond()); renderTree(); } }, "+ condition"),
        h("button", { class: "add-group", onclick: () => {
          node.children.push(newGroup(node.op === "and" ? "or" : "and")); renderTree(); } },
        "+ group"),
        h("button", { class: "add-json", onclick: () => {
          node.children.push(newJson()); renderTree(); } }, "+ JSON"),
        badge, remove),
      error,
      h("div", { class: "children" }, node.children.map((c) => renderNode(c, node))),
    ];
  } else if (node.type === "json") {
    body = [
      h("div", { class: "row" }, h("span", { class: "muted" }, "JSON rule"), not, badge, remove),
      h("textarea", { class: "json-node", "aria-label": "JSON rule", oninput: (e) => {
        node.text = e.target.value; changed(); } }, node.text),
      error,
    ];
  } else {
    body = [h("div", { class: "row" }, condControls(node), not, badge, remove), error];
  }
  const el = h("div", { class: `node ${node.type === "group" ? "group " + node.op : "cond"}`,
                        "data-node": node.id }, body);
  el.nodeError = error;
  el.nodeBadge = badge;
  return el;
}

function condControls(node) {
  const d = described;
  const kind = select({ class: "kind", "aria-label": "condition kind", onchange: (e) => {
    Object.assign(node, newCond(), { id: node.id, not: node.not, kind: e.target.value });
    renderTree(); } },
  [["field", "profile field"], ["event", "event"], ["orders", "orders"]], node.kind);
  if (node.kind === "field") return [kind, ...fieldControls(node, d.fields)];
  const times = h("input", { class: "times", value: node.times, size: 4, "aria-label": "how many",
                             oninput: (e) => { node.times = e.target.value; changed(); } });
  const compare = select({ class: "compare", "aria-label": "compare", onchange: (e) => {
    node.compare = e.target.value; changed(); } }, COMPARE, node.compare);
  const days = h("input", { class: "days", value: node.days, size: 4, placeholder: "any",
    "aria-label": "last days", oninput: (e) => { node.days = e.target.value; changed(); } });
  if (node.kind === "event") {
    const events = select({ class: "event", "aria-label": "event type", onchange: (e) => {
      node.event = e.target.value;
      node.prop = node.propOp = node.propValue = "";
      renderTree(); } },
    [["", "— event —"], ["*", "any event"], ...d.events.map((e) => [e.name, e.name])],
    node.event);
    const info = d.events.find((e) => e.name === node.event);
    const where = info && info.properties.length ? ["where",
      ...fieldControls(node, info.properties, "any", WHERE_KEYS)] : [];
    return [kind, events, ...where, compare, times, "times in the last", days, "days"];
  }
  const numeric = d.order_fields.filter((f) => f.type === "int" || f.type === "float");
  const agg = select({ class: "agg", "aria-label": "aggregate", onchange: (e) => {
    node.agg = e.target.value; renderTree(); } },
  [["count", "count"], ["sum", "sum of"], ["avg", "average"], ["min", "min"], ["max", "max"]],
  node.agg);
  const of = node.agg === "count" ? null : select({ class: "of", "aria-label": "of",
    onchange: (e) => { node.of = e.target.value; changed(); } },
  [["", "— field —"], ...numeric.map((f) => [f.name, f.name])], node.of);
  return [kind, "where", ...fieldControls(node, [...d.order_fields, ...d.item_fields], true),
          agg, of, compare, times, "in the last", days, "days"];
}

const FIELD_KEYS = { field: "field", op: "op", value: "value", css: "" };
const WHERE_KEYS = { field: "prop", op: "propOp", value: "propValue", css: "where-" };

// field → op fitting its type → value with suggestions from its top values. `keys`
// names the node's properties they edit (an event's `where` has its own).
function fieldControls(node, fields, optional, keys) {
  const k = keys || FIELD_KEYS;
  const type = fieldType(node[k.field], fields);
  const field = select({ class: k.css + "field", "aria-label": k.css + "field",
    onchange: (e) => {
      node[k.field] = e.target.value;
      node[k.op] = node[k.field] ? OPS[fieldType(node[k.field], fields)][0] : "";
      node[k.value] = "";
      renderTree(); } },
  [["", optional === true ? "— any order —" : optional ? "— any —" : "— field —"],
   ...fields.map((f) => [f.name, `${f.name} (${f.type})`])], node[k.field]);
  if (!node[k.field]) return [field];
  const op = select({ class: k.css + "op", "aria-label": k.css + "op", onchange: (e) => {
    node[k.op] = e.target.value; renderTree(); } },
  OPS[type].map((o) => [o, OP_WORDS[o]]), node[k.op] || OPS[type][0]);
  const info = fields.find((f) => f.name === node[k.field]);
  const listId = `${k.css}values-${node.id}`;
  const hint = info && info.min !== undefined ? `${info.min} … ${info.max}` :
    LIST_OPS.has(node[k.op]) ? "a, b, c" : "value";
  const needsValue = node[k.op] !== "exists" && node[k.op] !== "not_exists";
  const value = needsValue && h("input", { class: k.css + "value", value: node[k.value],
    list: listId, placeholder: node[k.op] === "between" ? "low, high" : hint,
    "aria-label": k.css + "value", oninput: (e) => { node[k.value] = e.target.value; changed(); },
    onfocus: () => k === FIELD_KEYS && suggest(node[k.field], listId) });
  const options = h("datalist", { id: listId },
    ((info && info.top) || []).map((v) => h("option", { value: v.value }, `${fmt(v.count)}`)));
  return [field, op, value, needsValue && options];
}

// More suggestions than Describe's top: the field's most common values.
async function suggest(field, listId) {
  if (field.includes(".") || !described.fields.some((f) => f.name === field)) return;
  try {
    const found = await api("Values", { field, limit: 100 });
    const list = document.getElementById(listId);
    if (list) list.replaceChildren(...found.values.map((v) =>
      h("option", { value: v.value }, fmt(v.count))));
  } catch (e) { /* suggestions are optional */ }
}

function scheduleCount() {
  clearTimeout(builder.timer);
  builder.timer = setTimeout(countNow, 250);
}

async function countNow() {
  const asked = ++builder.asked;
  const count = document.querySelector("[data-testid=count]");
  const summary = document.querySelector("[data-testid=summary]");
  if (!count) return;
  clearErrors();
  let built;
  try {
    built = builderRule(builder.root);
  } catch (e) {
    if (e instanceof NodeError) showNodeError(e.node, e.message);
    count.textContent = "—";
    summary.textContent = "";
    return;
  }
  const ruleJson = JSON.stringify(built.rule);
  const text = document.getElementById("rule-json");
  if (text && document.activeElement !== text) text.value = JSON.stringify(built.rule, null, 2);
  try {
    const [counted, explained] = await Promise.all([
      api("Count", { rule_json: ruleJson }), api("Explain", { rule_json: ruleJson })]);
    if (asked !== builder.asked) return; // a newer rule was asked meanwhile
    count.textContent = fmt(counted.count);
    count.dataset.count = counted.count;
    summary.textContent = explained.sentence || explained.text;
    showNodeCounts(built.paths, explained.root);
    showProblem(null);
  } catch (e) {
    if (asked !== builder.asked) return;
    count.textContent = "—";
    summary.textContent = "";
    const path = errorPath(e.message);
    const node = path && nodeOfPath(built.paths, path);
    if (e.status === 400 && node) showNodeError(node, e.message);
    else showProblem(e);
  }
}

function elementOf(node) { return document.querySelector(`[data-node="${node.id}"]`); }

function clearErrors() {
  for (const el of document.querySelectorAll(".node.has-error")) {
    el.classList.remove("has-error");
    el.nodeError.hidden = true;
  }
}

function showNodeError(node, message) {
  const el = elementOf(node);
  if (!el) return showProblem({ message });
  el.classList.add("has-error");
  el.nodeError.hidden = false;
  el.nodeError.textContent = message;
}

function showNodeCounts(paths, root) {
  const byPath = new Map();
  const walk = (n) => { byPath.set(n.path, n); (n.children || []).forEach(walk); };
  if (root) walk(root);
  for (const [path, node] of paths) {
    const el = elementOf(node);
    const found = byPath.get(path);
    if (el && found) el.nodeBadge.textContent = fmt(found.count);
  }
}

// Any rule into the builder: the forms it has controls for become controls, the
// others JSON nodes.
function fromRule(rule) {
  if (rule && typeof rule === "object" && !Array.isArray(rule)) {
    const keys = Object.keys(rule);
    if (keys.length === 1 && keys[0] === "not") {
      const inner = fromRule(rule.not);
      if (!inner.not) { inner.not = true; return inner; }
    }
    if (keys.length === 1 && (keys[0] === "and" || keys[0] === "or") &&
        Array.isArray(rule[keys[0]])) {
      const group = newGroup(keys[0]);
      group.children = rule[keys[0]].map(fromRule);
      return group;
    }
    if (keys.every((k) => ["field", "op", "value"].includes(k)) &&
        described.fields.some((f) => f.name === rule.field) && typeof rule.op === "string") {
      const cond = newCond();
      Object.assign(cond, { field: rule.field, op: rule.op, value: valueText(rule.value) });
      return cond;
    }
  }
  return newJson(JSON.stringify(rule, null, 1));
}

function valueText(value) {
  if (value === undefined) return "";
  if (Array.isArray(value) && value.every((v) => typeof v !== "object")) return value.join(", ");
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function loadJson() {
  const problem = document.getElementById("load-json-error");
  let rule;
  try {
    rule = JSON.parse(document.getElementById("rule-json").value);
  } catch (e) {
    problem.hidden = false;
    problem.textContent = e.message;
    return;
  }
  problem.hidden = true;
  const node = fromRule(rule);
  builder.root = node.type === "group" ? node : Object.assign(newGroup("and"),
    { children: [node] });
  renderTree();
}

// A template's parameters, each with its default, when "save" takes a template.
function showTemplate() {
  const chosen = templates.find((t) => t.name === document.getElementById("save-template").value);
  const box = document.getElementById("template-params");
  box.replaceChildren(...(chosen ? [h("span", { class: "muted" }, chosen.description),
    ...chosen.params.map((p) => h("label", { title: p.description }, p.name, " ",
      h("input", { class: "template-param", "data-param": p.name,
                   value: valueText(JSON.parse(p.default_json || "null") ?? "") })))] : []));
}

async function saveSegment() {
  const result = document.getElementById("save-result");
  const name = document.getElementById("save-name").value.trim();
  const tags = document.getElementById("save-tags").value.split(",")
    .map((t) => t.trim()).filter(Boolean);
  const template = document.getElementById("save-template").value;
  try {
    const request = { name, tags, kind: document.getElementById("save-kind").value };
    if (template) {
      request.template = template;
      request.params = Object.fromEntries([...document.querySelectorAll(".template-param")]
        .filter((i) => i.value.trim() !== "").map((i) => [i.dataset.param, i.value.trim()]));
    } else {
      request.rule_json = JSON.stringify(builderRule(builder.root).rule);
    }
    const made = await api("CreateSegment", request);
    result.textContent = `saved ${made.name}: ${fmt(made.size)} profiles`;
    location.hash = "#/segment/" + encodeURIComponent(made.name);
  } catch (e) {
    result.textContent = e.message;
  }
}

// ------------------------------------------------------------------ the segment list
async function pageSegments(main, query) {
  const tag = query.get("tag") || "";
  const [all, shown] = await Promise.all([api("ListSegments", {}),
    tag ? api("ListSegments", { tag }) : null]);
  const segments = (shown || all).segments;
  const tags = [...new Set(all.segments.flatMap((s) => s.tags || []))].sort();
  const rows = segments.map((s) => h("tr", { "data-segment": s.name },
    h("td", {}, h("input", { type: "checkbox", class: "pick", value: s.name,
                             "aria-label": "pick " + s.name })),
    h("td", {}, h("a", { href: "#/segment/" + encodeURIComponent(s.name) }, s.name)),
    h("td", { class: "kind" }, KIND_NAMES[s.kind] || s.kind),
    h("td", { class: "num size" }, fmt(s.size)),
    h("td", { class: "tags" }, (s.tags || []).map((t) => h("span", { class: "tag" }, t)))));
  main.append(
    h("h1", {}, "Segments"),
    h("div", { class: "row card" },
      "tag", select({ id: "tag-filter", "aria-label": "tag filter", onchange: (e) => {
        location.hash = "#/segments" + (e.target.value ? "?tag=" +
          encodeURIComponent(e.target.value) : ""); } },
      [["", "any"], ...tags.map((t) => [t, t])], tag),
      h("button", { id: "overlap-picked", onclick: () => {
        const picked = [...document.querySelectorAll(".pick:checked")].map((c) => c.value);
        location.hash = "#/overlap?segments=" + picked.map(encodeURIComponent).join(",");
      } }, "Overlap of the picked")),
    segments.length ? h("table", { id: "segment-list" },
      h("thead", {}, h("tr", {}, h("th"), h("th", {}, "name"), h("th", {}, "kind"),
        h("th", { class: "num" }, "size"), h("th", {}, "tags"))),
      h("tbody", {}, rows))
      : h("p", { class: "muted" }, "No segments yet: build one and save it."));
}

// ------------------------------------------------------------------ a segment's page
async function pageSegment(main, name) {
  const [segment, history, d] = await Promise.all([api("GetSegment", { name }),
    api("SegmentHistory", { name }), describe()]);
  const rule = segment.rule_json || "";
  main.append(
    h("h1", {}, segment.name, " ", h("span", { class: "muted" },
      KIND_NAMES[segment.kind] || segment.kind)),
    h("div", { class: "card" },
      h("div", { class: "live", "data-testid": "segment-size" }, fmt(segment.size)),
      h("div", { class: "muted" }, "profiles, of ", fmt(d.profiles)),
      h("div", {}, (segment.tags || []).map((t) => h("span", { class: "tag" }, t))),
      h("div", { class: "summary", id: "segment-summary" }),
      h("div", { class: "row" },
        segment.kind === "SEGMENT_KIND_MATERIALIZED" && h("button", { onclick: async () => {
          await api("RefreshSegment", { name }); route(); } }, "Refresh"),
        h("button", { id: "record-size", onclick: async () => {
          await api("RecordSegmentSize", { name }); route(); } }, "Record its size now"))),
    h("div", { class: "card" }, h("h2", {}, "Size over time"),
      lineChart(history.points.map((p) => ({ time: p.time, size: Number(p.size),
                                              cause: p.cause })))),
    h("div", { class: "card explain", id: "segment-explain" }, h("h2", {}, "Explain")),
    h("div", { class: "card" }, h("h2", {}, "Tags"), tagEditor(segment)),
    h("div", { class: "card" }, h("h2", {}, "Split into control groups"), splitter(segment)),
    h("div", { class: "card" }, h("h2", {}, "Export"), exporter(segment, d)),
    h("div", { class: "card", id: "segment-metrics" }, h("h2", {}, "Metrics")),
    h("div", { class: "card", id: "segment-preview" }, h("h2", {}, "Preview")),
    h("div", { class: "card", id: "segment-insights" }, h("h2", {}, "Insights")));
  const later = [];
  // a stored membership (static, materialized) is that of its last change: explain then
  const stored = segment.kind !== "SEGMENT_KIND_DYNAMIC" && segment.refreshed_at;
  const here = (fill) => (found) => { if (main.isConnected) fill(found); };
  if (rule) later.push(api("Explain", stored ? { rule_json: rule, as_of: segment.refreshed_at }
    : { rule_json: rule }).then(here((found) => {
    document.getElementById("segment-summary").textContent = found.sentence;
    document.getElementById("segment-explain").append(
      h("p", { class: "muted" }, "counted at ", found.as_of), explainTree(found.root));
  })));
  later.push(api("Metrics", { segment: name }).then(here((m) =>
    document.getElementById("segment-metrics").append(metricsTable(m)))));
  later.push(preview(name, d, main));
  later.push(api("Insights", { segment: name, top: 8, buckets: 10 }).then(here((found) =>
    document.getElementById("segment-insights").append(insightCharts(found)))));
  const failed = (await Promise.allSettled(later)).find((r) => r.status === "rejected");
  if (failed) showProblem(failed.reason);
}

function tagEditor(segment) {
  const input = h("input", { id: "tag-input", placeholder: "tag", "aria-label": "tag" });
  const retag = async (method, tags) => {
    try { await api(method, { name: segment.name, tags }); route(); } catch (e) { showProblem(e); }
  };
  return h("div", { class: "row", id: "tag-editor" },
    (segment.tags || []).map((t) => h("span", { class: "tag" }, t, " ",
      h("button", { class: "untag", title: "remove the tag " + t,
                    onclick: () => retag("RemoveTags", [t]) }, "×"))),
    input, h("button", { id: "tag-add", onclick: () => retag("AddTags", [input.value.trim()]) },
      "Add tag"));
}

// Static segments of the members in sample buckets: "test 45, other 45, control 10".
function splitter(segment) {
  const salt = h("input", { id: "split-salt", value: segment.name, "aria-label": "salt" });
  const parts = h("input", { id: "split-parts", class: "value", value: "test 90, control 10",
                             "aria-label": "parts" });
  const result = h("span", { class: "muted", id: "split-result" });
  return h("div", { class: "row" }, "salt", salt, "parts (label percent, ...)", parts,
    h("button", { id: "split", onclick: async () => {
      try {
        const into = parts.value.split(",").map((p) => p.trim().split(/\s+/))
          .map(([label, percent]) => ({ label, percent: Number(percent) }));
        const made = await api("SplitSegment", { name: segment.name, salt: salt.value, into });
        result.textContent = made.segments.map((m) => `${m.name}: ${fmt(m.size)}`).join("; ");
      } catch (e) { result.textContent = e.message; }
    } }, "Split"), result);
}

// The members having every required field, as a file (POST /export, the Members stream).
function exporter(segment, d) {
  const fields = h("input", { id: "export-fields", class: "value", "aria-label": "fields",
    value: d.fields.slice(0, 3).map((f) => f.name).join(", ") });
  const require = h("input", { id: "export-require", class: "value", placeholder: "none",
                               "aria-label": "required fields" });
  const format = select({ id: "export-format", "aria-label": "format" },
    [["csv", "CSV"], ["jsonl", "JSON Lines"]], "csv");
  const result = h("span", { class: "muted", id: "export-result" });
  const names = (input) => input.value.split(",").map((f) => f.trim()).filter(Boolean);
  return h("div", { class: "row" }, "fields", fields, "required", require, format,
    h("button", { id: "export", onclick: async () => {
      const headers = { "Content-Type": "application/json" };
      const token = document.getElementById("token").value.trim();
      if (token) headers.Authorization = "Bearer " + token;
      const answer = await fetch("/export", { method: "POST", headers, body: JSON.stringify({
        segment: segment.name, fields: names(fields), require: names(require),
        format: format.value }) });
      if (!answer.ok) { result.textContent = (await answer.json()).message; return; }
      const text = await answer.text();
      const rows = text.split("\n").filter(Boolean).length - (format.value === "csv" ? 1 : 0);
      const link = h("a", { href: URL.createObjectURL(new Blob([text])), id: "export-file",
                            download: `${segment.name}.${format.value}` }, "the file");
      result.replaceChildren(`${fmt(rows)} of ${fmt(answer.headers.get("X-Bitseg-Audience"))}`
        + " members exported: ", link);
      link.click();
    } }, "Export"), result);
}

function explainTree(node) {
  return h("ul", {}, h("li", { "data-path": node.path },
    h("span", { class: "count" }, fmt(node.count)), node.text,
    node.note && h("span", { class: "muted" }, " — ", node.note),
    (node.children || []).length ? node.children.map(explainTree) : null));
}

const MONEY = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2,
                                                maximumFractionDigits: 2 });
// Decimal text as people read it ("" is undefined: a division by zero).
const money = (text) => text === "" ? "" : MONEY.format(Number(text));
const pct = (text) => text === "" ? "" : MONEY.format(Number(text)) + " %";

function metricsTable(m) {
  const rows = [["profiles", fmt(m.profiles)], ["% of base", pct(m.share_of_profiles_pct)],
    ["orders", fmt(m.orders)], ["customers", fmt(m.customers)], ["revenue", money(m.revenue)],
    ["% of revenue", pct(m.share_of_revenue_pct)],
    ["average order value", money(m.average_order_value)]];
  return h("table", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k),
    h("td", { class: "num" }, v === "" ? "—" : v))));
}

async function preview(name, d, main) {
  const box = main.querySelector("#segment-preview");
  const chosen = new Set(d.fields.slice(0, 5).map((f) => f.name));
  const table = h("div");
  const draw = async () => {
    const found = await api("Preview", { segment: name, limit: 20 });
    const columns = d.fields.map((f) => f.name).filter((f) => chosen.has(f));
    table.replaceChildren(h("table", { id: "preview-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "id"), columns.map((c) => h("th", {}, c)))),
      h("tbody", {}, found.profiles.map((p) => h("tr", {}, h("td", {}, p.id),
        columns.map((c) => h("td", {}, cellText(p.fields[c]))))))));
  };
  box.append(h("div", { class: "row" }, "fields:", d.fields.map((f) => h("label", {},
    h("input", { type: "checkbox", checked: chosen.has(f.name), onchange: (e) => {
      if (e.target.checked) chosen.add(f.name); else chosen.delete(f.name);
      draw(); } }), f.name))), table);
  await draw();
}

function cellText(value) {
  if (value === undefined || value === null) return "";
  return Array.isArray(value) ? value.join(", ") : String(value);
}

// ------------------------------------------------------------------ the overlap page
async function pageOverlap(main, query) {
  const all = (await api("ListSegments", {})).segments;
  const picked = (query.get("segments") || "").split(",").filter(Boolean);
  main.append(h("h1", {}, "Overlap"),
    h("div", { class: "card row" }, all.map((s) => h("label", {},
      h("input", { type: "checkbox", class: "overlap-pick", value: s.name,
                   checked: picked.includes(s.name) }), s.name)),
    h("button", { id: "overlap-show", onclick: () => {
      const names = [...document.querySelectorAll(".overlap-pick:checked")].map((c) => c.value);
      location.hash = "#/overlap?segments=" + names.map(encodeURIComponent).join(",");
    } }, "Show")));
  if (picked.length) {
    const found = await api("Overlap", { segments: picked });
    main.append(h("div", { class: "card" }, heatmap(found)));
  }
}

// ------------------------------------------------------------------ charts (SVG)
// Round steps for an axis from 0 (or lo) to hi: 1, 2 or 5 times a power of ten.
function ticks(lo, hi, want) {
  if (hi <= lo) hi = lo + 1;
  const raw = (hi - lo) / (want || 5);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  if (out[out.length - 1] < hi) out.push(out[out.length - 1] + step);
  return out;
}

function lineChart(points) {
  if (!points.length) return h("p", { class: "muted" }, "No size history yet.");
  const W = 640, H = 240, L = 64, R = 16, T = 12, B = 44;
  const times = points.map((p) => Date.parse(p.time));
  let t0 = Math.min(...times), t1 = Math.max(...times);
  if (t1 === t0) { t0 -= 3600e3; t1 += 3600e3; }
  const ys = ticks(0, Math.max(...points.map((p) => p.size)), 4);
  const yMax = ys[ys.length - 1];
  const x = (t) => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = (v) => T + (H - T - B) * (1 - v / yMax);
  const span = t1 - t0;
  const label = (t) => new Date(t).toISOString().slice(0, span < 2 * 86400e3 ? 16 : 10)
    .replace("T", " ");
  const xTicks = [t0, t0 + span / 2, t1];
  return h("svg:svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "line-chart",
                        role: "img", "aria-label": "segment size over time" },
    h("svg:g", { class: "grid" }, ys.map((v) => h("svg:line", { x1: L, x2: W - R, y1: y(v),
                                                                  y2: y(v) }))),
    h("svg:g", { class: "axis y" }, h("svg:line", { x1: L, x2: L, y1: T, y2: H - B }),
      ys.map((v) => h("svg:text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v))),
      h("svg:text", { x: 12, y: T + (H - T - B) / 2, transform:
        `rotate(-90 12 ${T + (H - T - B) / 2})`, "text-anchor": "middle" }, "profiles")),
    h("svg:g", { class: "axis x" }, h("svg:line", { x1: L, x2: W - R, y1: H - B, y2: H - B }),
      xTicks.map((t, i) => h("svg:text", { x: x(t), y: H - B + 16,
        "text-anchor": ["start", "middle", "end"][i] }, label(t))),
      h("svg:text", { x: L + (W - L - R) / 2, y: H - 6, "text-anchor": "middle" }, "time (UTC)")),
    h("svg:polyline", { fill: "none", stroke: "#2f6fde", "stroke-width": 2,
      points: points.map((p, i) => `${x(times[i])},${y(p.size)}`).join(" ") }),
    points.map((p, i) => h("svg:circle", { class: "point", cx: x(times[i]), cy: y(p.size), r: 4,
      fill: "#2f6fde", "data-time": p.time, "data-size": p.size },
    h("svg:title", {}, `${p.time}: ${fmt(p.size)} (${p.cause})`))));
}

function heatmap(found) {
  const names = found.segments;
  const n = names.length, C = 84, L = 150, T = 110;
  const sizes = found.sizes.map(Number);
  const W = L + n * C + 10, H = T + n * C + 10;
  const cells = [];
  found.rows.forEach((row, i) => row.counts.map(Number).forEach((count, j) => {
    const base = Math.min(sizes[i], sizes[j]);
    const share = base ? count / base : 0; // of the smaller segment: 1 when one holds the other
    cells.push(h("svg:g", { class: "cell", "data-row": names[i], "data-col": names[j],
                            "data-count": count },
      h("svg:rect", { x: L + j * C, y: T + i * C, width: C - 2, height: C - 2,
        fill: `rgba(47, 111, 222, ${0.08 + 0.82 * share})` }),
      h("svg:text", { x: L + j * C + C / 2, y: T + i * C + C / 2 + 4, "text-anchor": "middle",
        style: share > 0.55 ? "fill: #fff" : "" }, fmt(count)),
      h("svg:title", {}, `${names[i]} ∩ ${names[j]}: ${fmt(count)} ` +
        `(${(100 * share).toFixed(1)}% of the smaller)`)));
  }));
  return h("div", {},
    h("svg:svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "heatmap", role: "img",
                   "aria-label": "pairwise intersections" },
      names.map((name, j) => h("svg:text", { x: L + j * C + C / 2, y: T - 8,
        transform: `rotate(-30 ${L + j * C + C / 2} ${T - 8})`, "text-anchor": "start" },
      name)),
      names.map((name, i) => h("svg:text", { x: L - 8, y: T + i * C + C / 2 + 4,
        "text-anchor": "end" }, `${name} (${fmt(sizes[i])})`)),
      cells),
    h("p", { class: "muted" }, "Each cell: profiles in both segments; the colour is its share "
      + "of the smaller segment."));
}

function barChart(title, bars) {
  // bars: [{label, value, base}] value and base as percentages
  const W = 360, row = 20, L = 110, T = 24, R = 70;
  const H = T + bars.length * row + 24;
  const top = ticks(0, Math.max(1, ...bars.map((b) => Math.max(b.value, b.base || 0))), 4);
  const max = top[top.length - 1];
  const x = (v) => L + (W - L - R) * v / max;
  return h("svg:svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "bar-chart",
                        role: "img", "aria-label": title },
    h("svg:text", { x: 0, y: 14, style: "font-weight: 600" }, title),
    h("svg:g", { class: "grid" }, top.map((v) => h("svg:line", { x1: x(v), x2: x(v), y1: T,
                                                                   y2: H - 22 }))),
    bars.map((b, i) => h("svg:g", {},
      h("svg:text", { x: L - 6, y: T + i * row + 14, "text-anchor": "end" },
        b.label.length > 16 ? b.label.slice(0, 15) + "…" : b.label),
      h("svg:rect", { x: L, y: T + i * row + 3, width: Math.max(0, x(b.value) - L),
                      height: row - 6, fill: "#2f6fde" }),
      b.base !== undefined && h("svg:line", { x1: x(b.base), x2: x(b.base), y1: T + i * row + 1,
        y2: T + (i + 1) * row - 1, stroke: "#b54708", "stroke-width": 2 }),
      h("svg:text", { x: x(b.value) + 4, y: T + i * row + 14 }, b.text),
      h("svg:title", {}, `${b.label}: ${b.text}`))),
    h("svg:g", { class: "axis x" }, top.map((v) => h("svg:text", { x: x(v), y: H - 8,
      "text-anchor": "middle" }, fmt(v) + (bars.unit || "")))));
}

function insightCharts(found) {
  const charts = [];
  for (const f of found.fields) {
    if (f.values && f.values.length) {
      const bars = f.values.map((v) => ({ label: String(JSON.parse(v.value_json)),
        value: Number(v.share_pct || 0), base: Number(v.base_share_pct || 0),
        text: `${fmt(v.count)} (${Number(v.share_pct || 0).toFixed(1)}%)` }));
      bars.unit = "%";
      charts.push(barChart(`${f.name}: % of the segment (line: of everyone)`, bars));
    } else if (f.buckets && f.buckets.length) {
      const bars = f.buckets.map((b) => ({ label: `${b.low} – ${b.high}`, value: Number(b.count),
                                            text: fmt(b.count) }));
      charts.push(barChart(`${f.name}: profiles by value`, bars));
    }
  }
  const audience = Number(found.profiles), everyone = Number(found.total_profiles);
  const share = (n, of) => (of ? 100 * Number(n) / of : 0);
  for (const e of found.events || []) {
    const bars = e.windows.map((w) => ({ label: `last ${fmt(w.days)} days`,
      value: share(w.profiles, audience), base: share(w.base_profiles, everyone),
      text: `${fmt(w.profiles)} (${share(w.profiles, audience).toFixed(1)}%)` }));
    bars.unit = "%";
    charts.push(barChart(`${e.event}: % of the segment who had one (line: of everyone)`, bars));
  }
  return h("div", { class: "charts" }, charts);
}

// ------------------------------------------------------------------ routing
async function route() {
  const [path, search] = (location.hash.slice(1) || "/builder").split("?");
  const query = new URLSearchParams(search || "");
  // Each visit renders into a container of its own: when the address changes before a
  // page's answers are in, the old page's late answers land in a detached container.
  const main = h("div");
  document.getElementById("page").replaceChildren(main);
  showProblem(null);
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === (parts[0] === "segment" ? "segments"
      : parts[0]));
  }
  try {
    if (parts[0] === "segments") await pageSegments(main, query);
    else if (parts[0] === "segment") await pageSegment(main, decodeURIComponent(parts[1]));
    else if (parts[0] === "overlap") await pageOverlap(main, query);
    else await pageBuilder(main);
  } catch (e) {
    showProblem(e);
  }
  if (main.isConnected) main.dataset.ready = location.hash || "#/builder";
}

window.addEventListener("hashchange", route);
document.getElementById("token").addEventListener("change", () => { described = null; route(); });
route();
