// fasb-server playground: chat through the public API and watch steering happen.
// No build step, no dependencies: an ES module the server ships next to index.html.

const $ = (id) => document.getElementById(id);
const RETRACT_LINGER_MS = 1500; // how long retracted text stays visible, struck through
const KEY_STORE = "fasb-playground-api-key";

const state = {
  model: null,
  behaviors: [], // /v1/models data[0].steering_behaviors
  history: [], // [{role, content}] of the chat so far (compare turns are not part of it)
  running: [], // AbortControllers of the requests in flight
};

// ---------------------------------------------------------------- API calls

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code || null;
    this.type = error?.type || null;
    this.param = error?.param || null;
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, body?.error || { message: `HTTP ${response.status} ${response.statusText}` });
}

// The modes the server accepts are the enum of `steering.mode` in its OpenAPI schema, so a mode
// added on the server shows up here with no edit to the page. /openapi.json needs no API key.
async function loadModes() {
  const response = await fetch("/openapi.json");
  if (!response.ok) throw await errorOf(response);
  const field = (await response.json()).components.schemas.SteeringRequest.properties.mode;
  const modes = (field.anyOf || [field]).flatMap((schema) => schema.enum || []);
  for (const select of [$("mode"), $("mode-b")]) fillModes(select, modes);
}

// Keeps the first option (the "default" choice) and the user's pick across reconnects.
function fillModes(select, modes) {
  const chosen = select.options.length > 1 ? select.value : select.dataset.preferred;
  select.replaceChildren(select.options[0], ...modes.map((mode) => new Option(mode, mode)));
  if (modes.includes(chosen)) select.value = chosen;
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: apiHeaders() });
  if (!response.ok) throw await errorOf(response);
  const card = (await response.json()).data[0];
  state.model = card.id;
  state.behaviors = card.steering_behaviors || [];
  $("model").textContent = `${card.id} · context ${card.max_model_len} tokens`;
  fillBehaviors();
}

// Yields each parsed `data:` payload of an SSE response; "[DONE]" ends it.
async function* sseEvents(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

// ---------------------------------------------------------------- settings

function numberOr(id, fallback) {
  const raw = $(id).value.trim();
  return raw === "" ? fallback : Number(raw);
}

// The behaviours picked in the (multiple) select, in the server's order; the first one if none is.
function selectedBehaviors() {
  const picked = [...$("behavior").selectedOptions].map((o) => o.value);
  const cards = state.behaviors.filter((b) => picked.includes(b.name));
  return cards.length ? cards : state.behaviors.slice(0, 1);
}

function currentBehavior() {
  return selectedBehaviors()[0] || null;
}

function behaviorLabel(b) {
  const quality = b.heldout_auroc != null ? `, AUROC ${b.heldout_auroc.toFixed(2)}` : "";
  return `${b.name} (${b.num_heads} heads${quality})`;
}

function fillBehaviors() {
  const select = $("behavior");
  select.replaceChildren(...state.behaviors.map((b, i) => {
    const option = new Option(behaviorLabel(b), b.name, i === 0, i === 0);
    option.title = b.description || "";
    return option;
  }));
  select.size = Math.min(Math.max(state.behaviors.length, 2), 6);
  const none = state.behaviors.length === 0;
  $("no-steering").hidden = !none;
  $("steering-a").disabled = none;
  $("steering-b").disabled = none;
  showDefaults();
}

// Empty steering fields mean "the server's default": show those defaults as placeholders.
function showDefaults() {
  const card = currentBehavior();
  for (const [id, field] of [["threshold", "threshold"], ["backtrack-tokens", "backtrack_tokens"]]) {
    $(id).placeholder = card ? String(card[field]) : "";
  }
  // `always` (ITI) defaults to the artifact's ITI strength, the other modes to FASB's alpha.
  const alphaFor = (mode) => (!card ? "" : String(mode === "always" && card.iti_alpha != null ? card.iti_alpha : card.alpha));
  $("alpha").placeholder = alphaFor($("mode").value);
  $("alpha-b").placeholder = $("alpha").value || alphaFor($("mode-b").value || $("mode").value);
  $("threshold-b").placeholder = $("threshold").value || $("threshold").placeholder;
  const threshold = effectiveThreshold("a");
  $("legend-tick").style.left = `${threshold * 100}%`;
  $("legend-threshold").textContent = `threshold ${threshold}`;
}

// The steering object of setting "a" or "b" (b overrides a's mode, alpha and threshold).
function steeringFor(which) {
  if (state.behaviors.length === 0) return null;
  const names = selectedBehaviors().map((b) => b.name);
  const steering = { behavior: names.length === 1 ? names[0] : names, stream_mode: $("stream-mode").value };
  const mode = $("mode").value;
  if (mode) steering.mode = mode;
  const alpha = numberOr("alpha", null);
  const threshold = numberOr("threshold", null);
  const backtrack = numberOr("backtrack-tokens", null);
  if (alpha !== null) steering.alpha = alpha;
  if (threshold !== null) steering.threshold = threshold;
  if (backtrack !== null) steering.backtrack_tokens = backtrack;
  if (which === "b") {
    if ($("mode-b").value) steering.mode = $("mode-b").value;
    const alphaB = numberOr("alpha-b", null);
    const thresholdB = numberOr("threshold-b", null);
    if (alphaB !== null) steering.alpha = alphaB;
    if (thresholdB !== null) steering.threshold = thresholdB;
  }
  if ($("return-scores").checked && steering.mode !== "off") steering.return_scores = true;
  return steering;
}

function effectiveThreshold(which) {
  const own = which === "b" ? numberOr("threshold-b", null) : null;
  const fallback = currentBehavior()?.threshold ?? 0.5;
  return own ?? numberOr("threshold", fallback);
}

function describe(steering) {
  if (!steering) return "no steering";
  const parts = [steering.mode || "default mode"];
  if (steering.alpha !== undefined) parts.push(`alpha ${steering.alpha}`);
  if (steering.threshold !== undefined) parts.push(`threshold ${steering.threshold}`);
  return parts.join(", ");
}

function requestBody(messages, steering) {
  const body = {
    model: state.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: numberOr("max-tokens", 128),
    temperature: numberOr("temperature", 0),
  };
  const seed = numberOr("seed", null);
  if (seed !== null) body.seed = seed;
  if (steering) {
    body.steering = steering;
    // Token boundaries for the score colours: each delta then says how many tokens it carries.
    if (steering.return_scores) body.logprobs = true;
  }
  return body;
}

// ---------------------------------------------------------------- one streamed answer

// The live view of one answer: text segments (one per delta), retractions, scores, backtracks.
class AnswerView {
  constructor(label, threshold) {
    this.threshold = threshold;
    this.segments = []; // [{text, tokens, el}] of the text currently kept
    this.steered = false; // a backtrack happened: what follows is regenerated, with steering
    this.liveBacktracks = [];
    this.el = document.createElement("article");
    this.el.className = "msg assistant";
    this.el.dataset.state = "streaming";
    this.el.innerHTML = `<div class="who"></div><div class="answer"></div><div class="meta muted small"></div>
      <ol class="backtracks small"></ol><div class="chart"></div>`;
    this.el.querySelector(".who").textContent = label;
    this.answer = this.el.querySelector(".answer");
    this.meta = this.el.querySelector(".meta");
  }

  get text() {
    return this.segments.map((s) => s.text).join("");
  }

  append(text, tokens) {
    if (!text && !tokens) return;
    const last = this.segments[this.segments.length - 1];
    if (!text && last) {
      last.tokens += tokens; // tokens whose text is still held back count with the previous piece
      return;
    }
    const el = document.createElement("span");
    el.className = this.steered ? "tok regen" : "tok";
    el.textContent = text;
    this.answer.append(el);
    this.segments.push({ text, tokens, el });
  }

  // Delete `text` from the end of what is shown: it stays visible struck through, then goes.
  retract(correction) {
    let remaining = correction.retract_text.length;
    const struck = [];
    while (remaining > 0 && this.segments.length) {
      const seg = this.segments[this.segments.length - 1];
      if (seg.text.length <= remaining) {
        this.segments.pop();
        remaining -= seg.text.length;
        seg.el.className = "tok retracted";
        struck.push(seg.el);
      } else {
        const keep = seg.text.length - remaining;
        const gone = document.createElement("span");
        gone.className = "tok retracted";
        gone.textContent = seg.text.slice(keep);
        seg.text = seg.text.slice(0, keep);
        seg.el.textContent = seg.text;
        seg.el.after(gone);
        struck.push(gone);
        remaining = 0;
      }
    }
    // The regenerated text goes after the struck text, so the reader sees what replaced what.
    this.steered = true;
    this.liveBacktracks.push(correction);
    this.el.dataset.retractions = String(this.liveBacktracks.length);
    this.showBacktracks(this.liveBacktracks.map((c) => ({
      token_index: null, tokens_retracted: c.retract_tokens, probe_score: c.probe_score, strength: c.strength,
      behaviors: c.behaviors || [],
    })));
    setTimeout(() => struck.forEach((el) => el.remove()), RETRACT_LINGER_MS);
  }

  showBacktracks(backtracks) {
    const list = this.el.querySelector(".backtracks");
    list.replaceChildren(...backtracks.map((b) => {
      const li = document.createElement("li");
      const at = b.token_index === null ? "" : `at token ${b.token_index}: `;
      const why = b.behaviors && b.behaviors.length ? ` (${b.behaviors.join(", ")})` : "";
      li.textContent = `Backtrack ${at}${b.tokens_retracted} tokens retracted, probe score ` +
        `${b.probe_score.toFixed(3)}, strength ${b.strength.toFixed(2)}${why}`;
      li.dataset.behaviors = (b.behaviors || []).join(",");
      return li;
    }));
  }

  finish(choice) {
    const report = choice.steering;
    const parts = [`finish: ${choice.finish_reason}`];
    if (report) {
      const names = report.behaviors && report.behaviors.length ? report.behaviors.join(", ") : report.behavior;
      parts.push(`steering ${report.mode}${names ? ` (${names})` : ""}`);
      parts.push(report.intervened ? "intervened" : "did not intervene");
      this.showBacktracks(report.backtracks);
      if (report.scores) this.colourTokens(report.scores, report.backtracks);
    }
    this.meta.textContent = parts.join(" · ");
    this.el.dataset.text = this.text;
    this.usageParts = parts;
  }

  showUsage(usage) {
    const extra = [`${usage.completion_tokens} tokens`];
    if (usage.discarded_tokens) extra.push(`${usage.discarded_tokens} discarded by backtracking`);
    this.meta.textContent = [...(this.usageParts || []), ...extra].join(" · ");
  }

  // Scores come once, per final answer token, on the finish chunk. Each kept segment knows how
  // many tokens it carries (from the delta's logprobs), so segment i gets its own tokens' scores;
  // a segment of several tokens shows their mean (all of them in its tooltip).
  colourTokens(scores, backtracks) {
    const counted = this.segments.reduce((n, s) => n + s.tokens, 0);
    const exact = counted === scores.length;
    let next = 0;
    this.segments.forEach((seg, i) => {
      let own;
      if (exact) {
        own = scores.slice(next, next + seg.tokens);
        next += seg.tokens;
      } else {
        // No token counts (or they disagree): spread the scores over the segments evenly.
        const at = Math.min(scores.length - 1, Math.floor((i * scores.length) / this.segments.length));
        own = [scores[at]];
      }
      if (!own.length) return;
      const score = own.reduce((a, b) => a + b, 0) / own.length;
      seg.el.style.backgroundColor = scoreColour(score);
      seg.el.dataset.score = score.toFixed(3);
      seg.el.title = `probe score ${own.map((s) => s.toFixed(3)).join(", ")}`;
      if (score < this.threshold) seg.el.classList.add("below");
    });
    this.el.dataset.scoring = exact ? "per-token" : "approximate";
    this.el.querySelector(".chart").replaceChildren(scoreChart(scores, backtracks, this.threshold));
  }

  end(stateName, message) {
    this.el.dataset.state = stateName;
    this.el.dataset.text = this.text;
    if (message) {
      const p = document.createElement("p");
      p.className = stateName === "error" ? "error" : "muted small";
      p.textContent = message;
      this.el.append(p);
    }
  }
}

// Red (0) through yellow to green (1): P(desired) under the probes.
function scoreColour(score) {
  const hue = Math.round(Math.max(0, Math.min(1, score)) * 120);
  return `hsl(${hue} 75% 82%)`;
}

const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// Score over the answer's tokens, the threshold as a dashed line, each backtrack as a point at
// the token where the check fired and the score that fired it (the discarded text's score, so it
// need not lie on the line, which is the final text's), plus a dotted line where regeneration began.
function scoreChart(scores, backtracks, threshold) {
  const W = 600, H = 120, pad = 24;
  const n = Math.max(scores.length, 2);
  const x = (i) => pad + (i / (n - 1)) * (W - 2 * pad);
  const y = (p) => 8 + (1 - p) * (H - 24);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "score-chart" });
  svg.append(svgEl("title", {}, `Probe score per token; threshold ${threshold}; ${backtracks.length} backtrack(s)`));
  svg.append(svgEl("rect", { x: pad, y: y(1), width: W - 2 * pad, height: y(0) - y(1), class: "frame" }));
  svg.append(svgEl("line", { x1: pad, x2: W - pad, y1: y(threshold), y2: y(threshold), class: "threshold" }));
  const labelY = threshold > 0.85 ? y(threshold) + 12 : y(threshold) - 4; // keep it inside the frame
  svg.append(svgEl("text", { x: W - pad - 2, y: labelY, "text-anchor": "end", class: "label" }, `threshold ${threshold}`));
  svg.append(svgEl("text", { x: 2, y: y(1) + 4, class: "label" }, "1"));
  svg.append(svgEl("text", { x: 2, y: y(0), class: "label" }, "0"));
  const points = scores.map((p, i) => `${x(i).toFixed(1)},${y(p).toFixed(1)}`).join(" ");
  svg.append(svgEl("polyline", { points, class: "scores" }));
  for (const b of backtracks) {
    // Where the regenerated text starts: the check's position less the tokens it took back.
    const from = x(Math.max(0, Math.min(b.token_index - b.tokens_retracted, n - 1)));
    svg.append(svgEl("line", { x1: from, x2: from, y1: y(1), y2: y(0), class: "resume" }));
    const dot = svgEl("circle", { cx: x(Math.min(b.token_index, n - 1)), cy: y(b.probe_score), r: 5, class: "backtrack" });
    dot.append(svgEl("title", {}, `backtrack at token ${b.token_index}: score ${b.probe_score.toFixed(3)}, ` +
      `${b.tokens_retracted} tokens retracted, strength ${b.strength.toFixed(2)}`));
    svg.append(dot);
  }
  svg.append(svgEl("text", { x: W / 2, y: H - 2, "text-anchor": "middle", class: "label" }, `token (0–${scores.length - 1})`));
  return svg;
}

// Stream one request into `view`; resolves to the final text (null when it failed or was stopped).
async function streamInto(view, body) {
  const controller = new AbortController();
  state.running.push(controller);
  updateButtons();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    for await (const chunk of sseEvents(response, controller.signal)) {
      if (chunk.error) throw new ApiError(0, chunk.error); // an error after the stream started
      if (chunk.usage && !chunk.choices?.length) {
        view.showUsage(chunk.usage);
        continue;
      }
      for (const choice of chunk.choices || []) {
        if (choice.steering?.type === "retract") view.retract(choice.steering);
        else if (choice.delta?.content || choice.logprobs?.content?.length) {
          view.append(choice.delta?.content || "", choice.logprobs?.content?.length || 0);
        }
        if (choice.finish_reason) view.finish(choice);
      }
    }
    view.end("done");
    return view.text;
  } catch (err) {
    if (controller.signal.aborted) {
      view.end("stopped", "Stopped: the request was cancelled.");
    } else {
      view.end("error", err instanceof ApiError ? errorText(err) : `Request failed: ${err.message}`);
      showAlert(err);
    }
    return null;
  } finally {
    state.running = state.running.filter((c) => c !== controller);
    updateButtons();
  }
}

// ---------------------------------------------------------------- page

function errorText(err) {
  const where = err.param ? ` (${err.param})` : "";
  const code = err.code || err.type;
  return `Error${err.status ? ` ${err.status}` : ""}${code ? ` ${code}` : ""}${where}: ${err.message}`;
}

function showAlert(err) {
  const alert = $("alert");
  if (!err) {
    alert.hidden = true;
    return;
  }
  alert.textContent = err instanceof ApiError ? errorText(err) : String(err.message || err);
  alert.hidden = false;
  if (err.status === 401) askForKey();
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

function updateButtons() {
  $("stop").disabled = state.running.length === 0;
  $("send").disabled = state.running.length > 0 || !state.model;
}

function userBubble(text) {
  const el = document.createElement("article");
  el.className = "msg user";
  el.innerHTML = `<div class="who">you</div><div class="answer"></div>`;
  el.querySelector(".answer").textContent = text;
  return el;
}

function baseMessages() {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }] : [];
}

async function send(prompt) {
  showAlert(null);
  const transcript = $("transcript");
  transcript.append(userBubble(prompt));
  if ($("compare").checked) {
    const row = document.createElement("div");
    row.className = "compare";
    const messages = [...baseMessages(), { role: "user", content: prompt }];
    const runs = ["a", "b"].map((which) => {
      const steering = steeringFor(which);
      const view = new AnswerView(`${which.toUpperCase()}: ${describe(steering)}`, effectiveThreshold(which));
      view.el.dataset.side = which;
      row.append(view.el);
      return [view, requestBody(messages, steering)];
    });
    transcript.append(row);
    row.scrollIntoView({ block: "end" });
    await Promise.all(runs.map(([view, body]) => streamInto(view, body)));
    return;
  }
  const steering = steeringFor("a");
  state.history.push({ role: "user", content: prompt });
  const view = new AnswerView(`assistant · ${describe(steering)}`, effectiveThreshold("a"));
  transcript.append(view.el);
  view.el.scrollIntoView({ block: "end" });
  const text = await streamInto(view, requestBody([...baseMessages(), ...state.history], steering));
  if (text === null) state.history.pop(); // a failed or stopped turn is not part of the conversation
  else state.history.push({ role: "assistant", content: text });
}

async function connect() {
  try {
    await loadModes();
    await loadModels();
    $("key-form").hidden = !sessionStorage.getItem(KEY_STORE);
    showAlert(null);
  } catch (err) {
    $("model").textContent = "not connected";
    showAlert(err);
  }
  updateButtons();
}

function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.running.length) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.running.forEach((c) => c.abort()));
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("transcript").replaceChildren();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    connect();
  });
  $("compare").addEventListener("change", () => {
    document.body.classList.toggle("comparing", $("compare").checked);
  });
  for (const id of ["behavior", "alpha", "threshold", "threshold-b"]) $(id).addEventListener("input", showDefaults);
  for (const id of ["mode", "mode-b"]) $(id).addEventListener("change", showDefaults);
  updateButtons();
  connect();
}

init();
