/* tl_circuits graph viewer (issue 15): an offline viewer of attribution graphs with head
 * loadings and QK terms. Plain JS + d3 (vendor/d3.min.js). All text from the document is
 * set with textContent (never innerHTML): prompts, tokens and labels are untrusted.
 *
 * Data: <script type="application/json" id="tl-graph"> when present (self-contained file),
 * else GET /api/graphs and /api/graph/<id> (tl-circuits serve).
 */
(function () {
  'use strict';
  // the page may include this script twice (inlined and by URL): run once
  if (window.__tlViewerLoaded) return;
  window.__tlViewerLoaded = true;

  var ROW_H0 = 90;         // world units between layer rows (at least)
  var MIN_COL_W = 56;      // world units per token position (at least)
  var NODE_STEP = 13;      // spacing of nodes inside a (layer, position) cell
  var MAX_DRAWN_EDGES = 20000;
  var AUTO_EDGE_TARGET = 4000; // big graphs start with about this many edges drawn
  var MAX_LIST = 100000;   // list items (all inputs are listed up to this)

  var COLORS = {
    pos: [33, 102, 172], neg: [178, 24, 43],
    error: '#9a9a9a', embedding: '#5a9e5a', logit: '#7b3294'
  };

  var timings = { start: performance.now(), firstRender: null, lastClick: null };
  var api = { timings: timings, ready: false };
  window.tlViewer = api;

  // ----------------------------------------------------------------------------- helpers
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function isNum(x) { return typeof x === 'number' && isFinite(x); }
  function fmt(x, d) {
    if (!isNum(x)) return 'n/a';
    d = d === undefined ? 4 : d;
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return x.toFixed(d);
  }
  function get(obj, path) {
    for (var i = 0; i < path.length; i++) {
      if (obj === null || obj === undefined || typeof obj !== 'object') return undefined;
      obj = obj[path[i]];
    }
    return obj;
  }
  function headName(m, h) { return 'L' + m + 'H' + h; }
  function bar(value, maxAbs, width) {
    var b = el('span', 'bar ' + (value >= 0 ? 'pos' : 'neg'));
    var frac = maxAbs > 0 ? Math.min(1, Math.abs(value) / maxAbs) : 0;
    b.style.width = Math.max(1, Math.round(frac * (width || 80))) + 'px';
    var cell = el('span', 'bar-cell');
    cell.style.width = (width || 80) + 'px';
    cell.appendChild(b);
    return cell;
  }

  // ------------------------------------------------------------------------------ state
  var S = {
    mode: 'file', graphId: null, doc: null,
    nodes: [], idIndex: new Map(), N: 0,
    src: null, tgt: null, w: null, E: 0,
    inStart: null, inList: null, outStart: null, outList: null,
    importance: null, nodeRank: null, edgeOrder: null,
    x: null, y: null, r: null, row: null, nRows: 0, nPos: 0, colX: [], colW: [],
    visibleNode: null, drawnEdges: null, quadtree: null,
    nodeQ: 0, edgeQ: 0,
    selNode: -1, selEdge: -1, selHead: null, hoverNode: -1,
    transform: d3.zoomIdentity, zoom: null, width: 0, height: 0, dpr: 1,
    tl: null, viewer: null, hl: null, qk: null,
    pinned: [], supernodes: [], maxAbsW: 1, drawQueued: false,
    subgraph: false, sub: null, foreignInfluence: false
  };

  // ----------------------------------------------------------------------------- loading
  function boot() {
    var dataEl = $('tl-graph');
    if (dataEl) {
      S.mode = 'file';
      var doc;
      try { doc = JSON.parse(dataEl.textContent); } catch (e) { return fail('the embedded graph is not valid JSON: ' + e.message); }
      load(doc, get(doc, ['metadata', 'slug']) || 'graph');
      return;
    }
    S.mode = 'served';
    fetch('api/graphs').then(function (r) {
      if (!r.ok) throw new Error('GET api/graphs: HTTP ' + r.status);
      return r.json();
    }).then(function (list) {
      var ids = graphIds(list);
      if (!ids.length) throw new Error('the server lists no graphs');
      var sel = $('graph-select');
      clear(sel);
      ids.forEach(function (g) {
        var o = el('option', null, g.label);
        o.value = g.id;
        sel.appendChild(o);
      });
      sel.hidden = ids.length < 2;
      sel.onchange = function () { openServed(sel.value); };
      var want = new URLSearchParams(location.search).get('graph');
      var first = ids.some(function (g) { return g.id === want; }) ? want : ids[0].id;
      sel.value = first;
      openServed(first);
    }).catch(function (e) { fail(String(e && e.message || e)); });
  }

  function graphIds(list) {
    if (list && !Array.isArray(list) && Array.isArray(list.graphs)) list = list.graphs;
    if (!Array.isArray(list)) return [];
    return list.map(function (g) {
      if (typeof g === 'string') return { id: g, label: g };
      var id = g.id !== undefined ? g.id : (g.slug !== undefined ? g.slug : g.name);
      var label = g.title || g.prompt || g.slug || id;
      return { id: String(id), label: String(label).slice(0, 120) };
    }).filter(function (g) { return g.id && g.id !== 'undefined'; });
  }

  function openServed(id) {
    $('loading').hidden = false;
    fetch('api/graph/' + encodeURIComponent(id)).then(function (r) {
      if (!r.ok) throw new Error('GET api/graph/' + id + ': HTTP ' + r.status);
      return r.json();
    }).then(function (doc) { load(doc, id); })
      .catch(function (e) { fail(String(e && e.message || e)); });
  }

  function fail(msg) {
    var l = $('loading');
    l.hidden = false;
    l.className = 'error';
    l.textContent = 'could not load the graph: ' + msg;
    api.error = msg;
  }

  // -------------------------------------------------------------------------- the model
  function load(doc, id) {
    if (!doc || !Array.isArray(doc.nodes)) return fail('the document has no "nodes" list');
    S.doc = doc; S.graphId = id;
    S.selNode = -1; S.selEdge = -1; S.selHead = null; S.hoverNode = -1;
    S.subgraph = false; S.sub = null;
    S.tl = get(doc, ['extra', 'tl_circuits']) || null;
    S.viewer = (S.tl && S.tl.viewer) || null;
    S.hl = (S.tl && S.tl.head_loadings) || null;
    S.qk = (S.tl && S.tl.qk) || null;

    var meta = doc.metadata || {};
    var nodes = doc.nodes.filter(function (n) { return n && n.node_id !== undefined && n.node_id !== null; });
    S.nodes = nodes; S.N = nodes.length;
    S.idIndex = new Map();
    for (var i = 0; i < nodes.length; i++) S.idIndex.set(String(nodes[i].node_id), i);

    var links = Array.isArray(doc.links) ? doc.links : [];
    var E = 0, src = new Int32Array(links.length), tgt = new Int32Array(links.length), w = new Float64Array(links.length);
    for (var j = 0; j < links.length; j++) {
      var L = links[j];
      if (!L) continue;
      var s = S.idIndex.get(String(L.source)), t = S.idIndex.get(String(L.target));
      var wt = Number(L.weight);
      if (s === undefined || t === undefined || !isFinite(wt)) continue;
      src[E] = s; tgt[E] = t; w[E] = wt; E++;
    }
    S.src = src.subarray(0, E); S.tgt = tgt.subarray(0, E); S.w = w.subarray(0, E); S.E = E;
    // influence: tl_circuits' own documents store per-node influence (higher = more
    // important); circuit-tracer / Neuronpedia store cumulative influence (lower = more
    // important; pruning keeps influence <= threshold)
    S.foreignInfluence = get(meta, ['info', 'generator', 'name']) !== 'tl_circuits';
    buildAdjacency();
    computeImportance();
    resize();
    computeLayout(meta);

    // header
    $('prompt').textContent = meta.prompt !== undefined ? String(meta.prompt) : (meta.prompt_tokens || []).join('');
    $('graph-slug').textContent = meta.slug ? String(meta.slug) : '';
    $('mode-note').textContent = S.mode === 'file' ? 'self-contained file (offline)' : 'served by tl-circuits serve';
    var ds = $('data-status');
    var missing = [];
    if (!S.hl) missing.push('head loadings');
    if (!S.qk) missing.push('QK terms');
    if (!S.viewer || !S.viewer.attention) missing.push('attention patterns');
    if (!S.tl) {
      ds.textContent = 'head/QK data is absent from this document (no extra.tl_circuits): showing the graph only.';
      ds.className = 'absent';
    } else if (missing.length) {
      ds.textContent = 'absent from this document: ' + missing.join(', ') + '.';
      ds.className = 'absent';
    } else {
      ds.textContent = 'head loadings, QK terms and attention patterns present.';
      ds.className = '';
    }
    loadAnnotations();
    updateSubgraphControls();
    renderHeadsList();
    ['node-panel', 'edge-panel', 'head-panel'].forEach(function (p) { $(p).hidden = true; });

    // thresholds: big graphs start with a few thousand edges drawn
    S.nodeQ = 0;
    S.edgeQ = E > AUTO_EDGE_TARGET ? Math.min(0.999, 1 - AUTO_EDGE_TARGET / E) : 0;
    $('node-threshold').value = 0;
    $('edge-threshold').value = (S.edgeQ * 100).toFixed(1);
    updateThresholdLabels();
    applyThresholds();
    resize();
    fitView();
    $('loading').hidden = true;
    renderTokens();
    drawNow();
    if (timings.firstRender === null) timings.firstRender = performance.now();
    api.ready = true;
    document.body.setAttribute('data-ready', '1');
    document.body.setAttribute('data-graph', String(id));
  }

  function buildAdjacency() {
    var N = S.N, E = S.E, i;
    var inDeg = new Int32Array(N + 1), outDeg = new Int32Array(N + 1);
    for (i = 0; i < E; i++) { inDeg[S.tgt[i] + 1]++; outDeg[S.src[i] + 1]++; }
    for (i = 0; i < N; i++) { inDeg[i + 1] += inDeg[i]; outDeg[i + 1] += outDeg[i]; }
    var inList = new Int32Array(E), outList = new Int32Array(E);
    var inFill = inDeg.slice(0, N), outFill = outDeg.slice(0, N);
    for (i = 0; i < E; i++) { inList[inFill[S.tgt[i]]++] = i; outList[outFill[S.src[i]]++] = i; }
    S.inStart = inDeg; S.inList = inList; S.outStart = outDeg; S.outList = outList;
  }
  function edgesOf(node, incoming) {
    var start = incoming ? S.inStart : S.outStart, list = incoming ? S.inList : S.outList;
    var out = Array.prototype.slice.call(list.subarray(start[node], start[node + 1]));
    out.sort(function (a, b) { return Math.abs(S.w[b]) - Math.abs(S.w[a]); });
    return out;
  }

  function kindOf(n) {
    if (n.is_target_logit || n.feature_type === 'logit') return 'logit';
    var ft = String(n.feature_type || '');
    if (ft === 'embedding' || n.layer === 'E') return 'embedding';
    if (ft.indexOf('error') >= 0) return 'error';
    return 'feature';
  }

  // Importance: |influence| when the document has it (tl_circuits' documents: per-node
  // influence), 1 - influence clamped to [0, 1] for other tools' documents (cumulative
  // influence, lower = more important), else the node's flow (the sum of |weight| over its
  // links).
  function computeImportance() {
    var N = S.N, imp = new Float64Array(N), i;
    var haveInfl = false;
    for (i = 0; i < N; i++) if (isNum(S.nodes[i].influence)) { haveInfl = true; break; }
    var flow = new Float64Array(N);
    for (i = 0; i < S.E; i++) { var a = Math.abs(S.w[i]); flow[S.src[i]] += a; flow[S.tgt[i]] += a; }
    var cumulative = haveInfl && S.foreignInfluence;
    S.importanceSource = !haveInfl ? 'total |weight| of its links (no influence in the document)' :
      (cumulative ? '1 \u2212 cumulative influence (circuit-tracer convention: lower influence = more important)' : 'influence');
    for (i = 0; i < N; i++) {
      var n = S.nodes[i];
      if (!haveInfl) imp[i] = flow[i];
      else if (!isNum(n.influence)) imp[i] = 0;
      else imp[i] = cumulative ? Math.max(0, Math.min(1, 1 - n.influence)) : Math.abs(n.influence);
    }
    var order = new Int32Array(N);
    for (i = 0; i < N; i++) order[i] = i;
    order.sort(function (a, b) { return imp[a] - imp[b]; });
    var rank = new Float64Array(N);   // quantile in [0, 1): 0 = least important
    for (i = 0; i < N; i++) rank[order[i]] = N > 1 ? i / N : 0;
    S.importance = imp; S.nodeRank = rank;
    var maxImp = 0;
    for (i = 0; i < N; i++) if (imp[i] > maxImp) maxImp = imp[i];
    S.maxImp = maxImp || 1;
    var eo = new Int32Array(S.E);
    for (i = 0; i < S.E; i++) eo[i] = i;
    eo.sort(function (a, b) { return Math.abs(S.w[b]) - Math.abs(S.w[a]); });
    S.edgeOrder = eo;
    S.maxAbsW = S.E ? Math.abs(S.w[eo[0]]) || 1 : 1;
  }

  function computeLayout(meta) {
    var N = S.N, i;
    var nLayers = get(S.tl, ['n_layers']) || get(S.viewer, ['n_layers']);
    var maxLayer = -1;
    var kinds = new Array(N);
    for (i = 0; i < N; i++) {
      var n = S.nodes[i];
      kinds[i] = kindOf(n);
      if (kinds[i] !== 'logit' && kinds[i] !== 'embedding') {
        var l = parseInt(n.layer, 10);
        if (isFinite(l) && l > maxLayer) maxLayer = l;
      }
    }
    if (!isNum(nLayers)) nLayers = maxLayer + 1;
    nLayers = Math.max(nLayers, maxLayer + 1, 0);
    S.kinds = kinds;
    S.nLayers = nLayers;
    S.nRows = nLayers + 2;
    var row = new Int32Array(N);
    var tokens = Array.isArray(meta.prompt_tokens) ? meta.prompt_tokens : [];
    var nPos = tokens.length;
    for (i = 0; i < N; i++) {
      var k = kinds[i];
      row[i] = k === 'logit' ? nLayers + 1 : (k === 'embedding' ? 0 : (parseInt(S.nodes[i].layer, 10) + 1 || 1));
      var p = S.nodes[i].ctx_idx | 0;
      if (p + 1 > nPos) nPos = p + 1;
    }
    S.row = row; S.nPos = nPos; S.tokens = tokens;
    // cells
    var cells = new Map();
    for (i = 0; i < N; i++) {
      var key = row[i] * 1e7 + Math.max(0, S.nodes[i].ctx_idx | 0);
      var c = cells.get(key);
      if (!c) { c = []; cells.set(key, c); }
      c.push(i);
    }
    var perCol = new Int32Array(nPos);
    cells.forEach(function (list, key) {
      var p = key % 1e7;
      if (list.length > perCol[p]) perCol[p] = list.length;
    });
    var colW = [], colX = [], x0 = 0, perLine = [];
    for (var p = 0; p < nPos; p++) {
      // wide enough for up to 6 nodes on a line, then the cell wraps into sub-rows
      var want = Math.min(perCol[p], 6) * NODE_STEP + 24;
      colW[p] = Math.max(MIN_COL_W, want);
      colX[p] = x0 + colW[p] / 2;
      x0 += colW[p];
    }
    // rows tall enough that the graph fills the view when fitted to its width
    var aspect = S.height > 0 && S.width > 0 ? S.height / S.width : 0.6;
    var ROW_H = Math.max(ROW_H0, Math.min(4 * ROW_H0, (x0 * aspect - 60) / S.nRows));
    S.rowH = ROW_H;
    S.colW = colW; S.colX = colX; S.worldW = x0; S.worldH = S.nRows * ROW_H;
    var X = new Float64Array(N), Y = new Float64Array(N), R = new Float64Array(N);
    var imp = S.importance, maxImp = S.maxImp;
    cells.forEach(function (list, key) {
      var rr = Math.floor(key / 1e7), p = key % 1e7;
      list.sort(function (a, b) { return imp[b] - imp[a]; });
      var k = Math.max(1, Math.floor((colW[p] - 16) / NODE_STEP));
      var lines = Math.ceil(list.length / k);
      var lineStep = lines > 1 ? Math.min(NODE_STEP, (ROW_H - 24) / (lines - 1)) : 0;
      var yc = (S.nRows - 1 - rr) * ROW_H + ROW_H / 2;
      for (var j = 0; j < list.length; j++) {
        var line = Math.floor(j / k), inLine = j % k;
        var count = Math.min(k, list.length - line * k);
        var step = Math.min(NODE_STEP, (colW[p] - 16) / Math.max(1, count));
        var ni = list[j];
        X[ni] = colX[p] + (inLine - (count - 1) / 2) * step;
        Y[ni] = yc + (line - (lines - 1) / 2) * lineStep;
        var t = Math.sqrt(imp[ni] / maxImp);
        R[ni] = kinds[ni] === 'logit' ? 6.5 : 2.5 + 4 * t;
      }
    });
    S.x = X; S.y = Y; S.r = R;
  }

  // ------------------------------------------------------------------------ thresholds
  function applyThresholds() {
    var N = S.N, i;
    var vis = new Uint8Array(N);
    var nVis = 0;
    for (i = 0; i < N; i++) {
      var show = S.kinds[i] === 'logit' || S.nodeRank[i] >= S.nodeQ - 1e-12;
      vis[i] = show ? 1 : 0;
      if (show) nVis++;
    }
    S.visibleNode = vis; S.nVisible = nVis;
    var keep = Math.ceil((1 - S.edgeQ) * S.E);
    var drawn = [];
    for (i = 0; i < keep && drawn.length < MAX_DRAWN_EDGES; i++) {
      var e = S.edgeOrder[i];
      if (vis[S.src[e]] && vis[S.tgt[e]]) drawn.push(e);
    }
    S.drawnEdges = drawn;
    var vlist = [];
    for (i = 0; i < N; i++) if (vis[i]) vlist.push(i);
    S.quadtree = d3.quadtree().x(function (d) { return S.x[d]; }).y(function (d) { return S.y[d]; }).addAll(vlist);
    $('counts').textContent = nVis + ' / ' + N + ' nodes shown, ' + drawn.length + ' / ' + S.E + ' edges drawn' +
      (drawn.length >= MAX_DRAWN_EDGES ? ' (capped at ' + MAX_DRAWN_EDGES + ')' : '') +
      '; node size and threshold by ' + S.importanceSource + '.';
  }
  function updateThresholdLabels() {
    $('node-threshold-value').textContent = Math.round(S.nodeQ * 100) + '%';
    $('edge-threshold-value').textContent = (S.edgeQ * 100).toFixed(1) + '%';
  }

  // ---------------------------------------------------------------------------- drawing
  var canvas = null, ctx = null;

  function resize() {
    var box = canvas.getBoundingClientRect();
    S.dpr = window.devicePixelRatio || 1;
    S.width = Math.max(1, box.width); S.height = Math.max(1, box.height);
    canvas.width = Math.round(S.width * S.dpr);
    canvas.height = Math.round(S.height * S.dpr);
  }
  function fitView() {
    var pad = 40;
    var sx = (S.width - 2 * pad) / Math.max(1, S.worldW), sy = (S.height - 2 * pad) / Math.max(1, S.worldH);
    var k = Math.max(0.02, Math.min(sx, sy, 4));
    var tx = (S.width - S.worldW * k) / 2, ty = (S.height - S.worldH * k) / 2;
    var t = d3.zoomIdentity.translate(tx, ty).scale(k);
    d3.select(canvas).call(S.zoom.transform, t);
  }
  function requestDraw() {
    if (S.drawQueued) return;
    S.drawQueued = true;
    requestAnimationFrame(function () { S.drawQueued = false; drawNow(); });
  }

  function drawNow() {
    if (!S.doc) return;
    var t = S.transform, k = t.k, dpr = S.dpr;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(dpr * k, 0, 0, dpr * k, dpr * t.x, dpr * t.y);
    // rows
    ctx.lineWidth = 1 / k;
    for (var rr = 0; rr < S.nRows; rr++) {
      var y = (S.nRows - 1 - rr) * S.rowH;
      ctx.fillStyle = rr % 2 ? '#fafaf8' : '#ffffff';
      ctx.fillRect(0, y, S.worldW, S.rowH);
    }
    if (S.subgraph && S.sub) {
      drawSubLinks();
    } else {
      var focus = S.selNode >= 0 || S.selEdge >= 0;
      drawEdgeBatch(S.drawnEdges, focus ? 0.25 : 1, 1);
      if (S.selNode >= 0) {
        drawEdgeBatch(edgesOf(S.selNode, true).concat(edgesOf(S.selNode, false)), 1, 1.8);
      }
      if (S.selEdge >= 0) drawEdgeBatch([S.selEdge], 1, 1.6, 'rgba(17,17,17,0.85)');
    }
    drawNodes();
    // row labels, in screen space
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = '#8a8a8f';
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    for (rr = 0; rr < S.nRows; rr++) {
      var yy = t.applyY((S.nRows - 1 - rr) * S.rowH + S.rowH / 2);
      if (yy < -10 || yy > S.height + 10) continue;
      var name = rr === 0 ? 'emb' : (rr === S.nRows - 1 ? 'logit' : 'L' + (rr - 1));
      ctx.fillText(name, 4, yy);
    }
    if (S.subgraph && S.sub) drawSubLabels();
    renderTokens();
  }

  function drawEdgeBatch(list, alphaScale, widthScale, solid) {
    var k = S.transform.k, NB = 6;
    var buckets = [];
    for (var b = 0; b < 2 * NB; b++) buckets.push([]);
    var maxW = S.maxAbsW;
    for (var i = 0; i < list.length; i++) {
      var e = list[i];
      var f = Math.sqrt(Math.abs(S.w[e]) / maxW);
      var bi = Math.min(NB - 1, Math.floor(f * NB));
      buckets[(S.w[e] >= 0 ? 0 : NB) + bi].push(e);
    }
    for (b = 0; b < 2 * NB; b++) {
      var bl = buckets[b];
      if (!bl.length) continue;
      var lvl = (b % NB + 1) / NB, c = b < NB ? COLORS.pos : COLORS.neg;
      ctx.strokeStyle = solid || ('rgba(' + c[0] + ',' + c[1] + ',' + c[2] + ',' + Math.min(1, (0.12 + 0.75 * lvl) * alphaScale) + ')');
      ctx.lineWidth = (0.4 + 2.6 * lvl) * widthScale / k;  // constant on screen
      ctx.beginPath();
      for (var j = 0; j < bl.length; j++) {
        var ee = bl[j], s = S.src[ee], tt = S.tgt[ee];
        ctx.moveTo(S.x[s], S.y[s]);
        ctx.lineTo(S.x[tt], S.y[tt]);
      }
      ctx.stroke();
    }
  }

  function nodeColor(i) {
    var kind = S.kinds[i];
    if (kind === 'error') return COLORS.error;
    if (kind === 'embedding') return COLORS.embedding;
    if (kind === 'logit') return COLORS.logit;
    return d3.interpolateOranges(0.35 + 0.6 * Math.sqrt(S.importance[i] / S.maxImp));
  }

  function drawnNodes() { return S.subgraph && S.sub ? S.sub.vis : S.visibleNode; }

  function drawNodes() {
    var k = S.transform.k, vis = drawnNodes();
    var groups = new Map();
    for (var i = 0; i < S.N; i++) {
      if (!vis[i]) continue;
      var key = S.kinds[i] + '|' + nodeColor(i);
      var g = groups.get(key);
      if (!g) { g = []; groups.set(key, g); }
      g.push(i);
    }
    ctx.lineWidth = 0.8 / k;
    ctx.strokeStyle = 'rgba(0,0,0,0.55)';
    groups.forEach(function (list, key) {
      var kind = key.split('|')[0];
      ctx.fillStyle = key.slice(kind.length + 1);
      ctx.beginPath();
      for (var j = 0; j < list.length; j++) shape(kind, list[j]);
      ctx.fill();
      ctx.stroke();
    });
    var pinnedSet = new Set(S.pinned);
    ctx.lineWidth = 2 / k;
    ctx.strokeStyle = '#c26a00';
    ctx.beginPath();
    pinnedSet.forEach(function (id) {
      var i = S.idIndex.get(id);
      if (i === undefined || !vis[i]) return;
      ctx.moveTo(S.x[i] + S.r[i] + 3, S.y[i]);
      ctx.arc(S.x[i], S.y[i], S.r[i] + 3, 0, 2 * Math.PI);
    });
    ctx.stroke();
    var ring = function (i, color, width) {
      if (i < 0 || !vis[i]) return;
      ctx.lineWidth = width / k;
      ctx.strokeStyle = color;
      ctx.beginPath();
      ctx.arc(S.x[i], S.y[i], S.r[i] + 2.5, 0, 2 * Math.PI);
      ctx.stroke();
    };
    ring(S.hoverNode, '#555', 1.5);
    ring(S.selNode, '#111', 2.5);
    if (S.selEdge >= 0) { ring(S.src[S.selEdge], '#111', 1.5); ring(S.tgt[S.selEdge], '#111', 1.5); }
  }

  function shape(kind, i) {
    var x = S.x[i], y = S.y[i], r = S.r[i];
    if (kind === 'feature') { ctx.moveTo(x + r, y); ctx.arc(x, y, r, 0, 2 * Math.PI); }
    else if (kind === 'error') { ctx.rect(x - r, y - r, 2 * r, 2 * r); }
    else if (kind === 'embedding') { ctx.moveTo(x, y - r * 1.2); ctx.lineTo(x + r * 1.2, y); ctx.lineTo(x, y + r * 1.2); ctx.lineTo(x - r * 1.2, y); ctx.closePath(); }
    else { ctx.moveTo(x, y - r * 1.2); ctx.lineTo(x + r * 1.1, y + r * 0.8); ctx.lineTo(x - r * 1.1, y + r * 0.8); ctx.closePath(); }
  }

  var tokenEls = [];
  function renderTokens() {
    var axis = $('token-axis');
    if (tokenEls.length !== S.nPos || axis.childNodes.length !== S.nPos) {
      clear(axis); tokenEls = [];
      for (var p = 0; p < S.nPos; p++) {
        var d = el('div', 'token');
        var tok = p < S.tokens.length ? String(S.tokens[p]) : '';
        d.appendChild(document.createTextNode(tok));
        d.appendChild(el('span', 'pos', p));
        d.title = tok + ' (position ' + p + ')';
        axis.appendChild(d);
        tokenEls.push(d);
      }
    }
    var t = S.transform;
    var activeP = -1;
    if (S.selNode >= 0) activeP = S.nodes[S.selNode].ctx_idx | 0;
    for (var q = 0; q < tokenEls.length; q++) {
      var sx = t.applyX(S.colX[q]), w = S.colW[q] * t.k;
      var e = tokenEls[q];
      if (sx < -w || sx > S.width + w || w < 6) { e.style.display = 'none'; continue; }
      e.style.display = '';
      e.style.left = sx + 'px';
      var vertical = w < 40;   // narrow columns: the token runs upwards
      e.classList.toggle('vertical', vertical);
      e.style.maxWidth = vertical ? '' : Math.max(6, w - 2) + 'px';
      e.classList.toggle('active', q === activeP);
    }
  }

  // ----------------------------------------------------------------------- hit testing
  function nodeAt(sx, sy) {
    var t = S.transform;
    var wx = t.invertX(sx), wy = t.invertY(sy);
    var radius = (8 + 4) / Math.max(t.k, 1e-6);
    var qt = S.subgraph && S.sub ? S.sub.quadtree : S.quadtree;
    var best = qt.find(wx, wy, Math.max(radius, 10));
    if (best === undefined) return -1;
    var d = Math.hypot(S.x[best] - wx, S.y[best] - wy) * t.k;
    return d <= S.r[best] * t.k + 5 ? best : -1;
  }
  function edgeAt(sx, sy) {
    var t = S.transform, best = -1, bestD = 5;
    if (S.subgraph) return -1;   // the subgraph view draws merged links, not the document's
    var cands = S.drawnEdges;
    if (S.selNode >= 0) cands = cands.concat(edgesOf(S.selNode, true), edgesOf(S.selNode, false));
    for (var i = 0; i < cands.length; i++) {
      var e = cands[i];
      var ax = t.applyX(S.x[S.src[e]]), ay = t.applyY(S.y[S.src[e]]);
      var bx = t.applyX(S.x[S.tgt[e]]), by = t.applyY(S.y[S.tgt[e]]);
      var dx = bx - ax, dy = by - ay, L2 = dx * dx + dy * dy;
      var u = L2 > 0 ? Math.max(0, Math.min(1, ((sx - ax) * dx + (sy - ay) * dy) / L2)) : 0;
      var d = Math.hypot(sx - (ax + u * dx), sy - (ay + u * dy));
      if (d < bestD) { bestD = d; best = e; }
    }
    return best;
  }

  // -------------------------------------------------------------------------- labels
  function tokenAt(p) { return p >= 0 && p < S.tokens.length ? String(S.tokens[p]) : '?'; }
  function nodeLabel(i) {
    var n = S.nodes[i];
    if (n.clerp) return String(n.clerp);
    var kind = S.kinds[i];
    if (kind === 'embedding') return 'emb "' + tokenAt(n.ctx_idx | 0) + '" @' + (n.ctx_idx | 0);
    if (kind === 'error') return 'MLP error L' + n.layer + ' @' + n.ctx_idx;
    if (kind === 'logit') return 'logit ' + n.node_id;
    return 'L' + n.layer + ' #' + n.feature + ' @' + n.ctx_idx;
  }
  function componentLabel(id) {
    if (id === 'bias') return 'bias (constants)';
    if (id === 'excluded') return 'excluded nodes';
    var i = S.idIndex.get(String(id));
    return i === undefined ? String(id) : nodeLabel(i);
  }
  function linkKey(e) { return String(S.nodes[S.src[e]].node_id) + '->' + String(S.nodes[S.tgt[e]].node_id); }
  function kindName(i) { return String(S.nodes[i].feature_type || S.kinds[i]); }

  // -------------------------------------------------------------------------- panels
  function panelHeader(panel, title) {
    clear(panel);
    var x = el('button', 'close', '\u00d7');
    x.type = 'button';
    x.title = 'close';
    x.onclick = function () { panel.hidden = true; if (panel.id === 'node-panel') { S.selNode = -1; requestDraw(); } if (panel.id === 'edge-panel') { S.selEdge = -1; requestDraw(); } };
    panel.appendChild(x);
    panel.appendChild(el('h3', null, title));
  }
  function facts(panel, rows) {
    var dl = el('dl', 'facts');
    rows.forEach(function (r) { dl.appendChild(el('dt', null, r[0])); dl.appendChild(el('dd', r[2] || null, r[1])); });
    panel.appendChild(dl);
    return dl;
  }

  function selectNode(i) {
    S.selNode = i; S.selEdge = -1;
    showNodePanel(i);
    $('edge-panel').hidden = true;
    requestDraw();
  }

  function showNodePanel(i) {
    var n = S.nodes[i], panel = $('node-panel');
    panel.hidden = false;
    panelHeader(panel, nodeLabel(i));
    panel.setAttribute('data-node', String(n.node_id));
    var p = n.ctx_idx | 0;
    facts(panel, [
      ['id', n.node_id], ['kind', kindName(i)], ['layer', n.layer],
      ['position', p + ' "' + tokenAt(p) + '"'],
      ['activation', fmt(n.activation)], ['influence', fmt(n.influence)],
      ['feature', n.feature === undefined || n.feature === null ? 'n/a' : n.feature]
    ].concat(S.kinds[i] === 'logit' ? [['probability', fmt(n.token_prob)]] : []));
    var row = el('div', 'row');
    var pin = el('button', null, S.pinned.indexOf(String(n.node_id)) >= 0 ? 'unpin' : 'pin');
    pin.type = 'button'; pin.id = 'pin-button';
    pin.onclick = function () { togglePin(String(n.node_id)); pin.textContent = S.pinned.indexOf(String(n.node_id)) >= 0 ? 'unpin' : 'pin'; };
    row.appendChild(pin);
    panel.appendChild(row);
    edgeList(panel, 'inputs', edgesOf(i, true), true);
    edgeList(panel, 'outputs', edgesOf(i, false), false);
    featureCard(panel, String(n.node_id));
  }

  function edgeList(panel, title, list, incoming) {
    panel.appendChild(el('h4', null, title + ' (' + list.length + ')'));
    if (!list.length) { panel.appendChild(el('div', 'note', 'none')); return; }
    var ul = el('ul', 'edges ' + (incoming ? 'input-edges' : 'output-edges'));
    var frag = document.createDocumentFragment();
    var maxAbs = Math.abs(S.w[list[0]]) || 1;
    for (var j = 0; j < list.length && j < MAX_LIST; j++) {
      var e = list[j], other = incoming ? S.src[e] : S.tgt[e];
      var li = el('li', incoming ? 'input-edge' : 'output-edge');
      li.setAttribute('data-source', String(S.nodes[S.src[e]].node_id));
      li.setAttribute('data-target', String(S.nodes[S.tgt[e]].node_id));
      li.setAttribute('data-weight', String(S.w[e]));
      li.setAttribute('data-link', String(e));
      li.appendChild(bar(S.w[e], maxAbs, 40));
      var lbl = el('span', 'lbl', nodeLabel(other));
      lbl.title = String(S.nodes[other].node_id);
      li.appendChild(lbl);
      li.appendChild(el('span', 'w ' + (S.w[e] >= 0 ? 'pos-text' : 'neg-text'), fmt(S.w[e])));
      frag.appendChild(li);
    }
    ul.appendChild(frag);
    ul.onclick = function (ev) {
      var li = ev.target.closest('li');
      if (li) selectEdge(parseInt(li.getAttribute('data-link'), 10));
    };
    panel.appendChild(ul);
  }

  function featureCard(panel, id) {
    var card = get(S.viewer, ['feature_cards', id]);
    if (!card || !Array.isArray(card.contexts) || !card.contexts.length) return;
    panel.appendChild(el('h4', null, 'feature card: top contexts'));
    card.contexts.forEach(function (c) {
      var div = el('div', 'card-context');
      var toks = c.tokens || [], acts = c.acts || [];
      var mx = isNum(c.max_act) && c.max_act > 0 ? c.max_act : Math.max.apply(null, acts.concat([1e-9]));
      toks.forEach(function (tok, j) {
        var s = el('span', null, tok);
        var a = Number(acts[j]) || 0;
        if (a > 0) s.style.background = 'rgba(224,130,20,' + Math.min(0.9, a / mx).toFixed(3) + ')';
        if (j === c.max_pos) s.style.outline = '1px solid #c26a00';
        s.title = 'activation ' + fmt(a);
        div.appendChild(s);
      });
      div.appendChild(el('span', 'note', '  max ' + fmt(c.max_act, 3)));
      panel.appendChild(div);
    });
  }

  function selectEdge(e) {
    if (!(e >= 0 && e < S.E)) return;
    S.selEdge = e;
    showEdgePanel(e);
    $('edge-panel').scrollIntoView({ block: 'nearest' });
    requestDraw();
  }

  // heads of an edge: [{layer, loadings: [{head, value}], bypass}] from viewer.link_heads,
  // else from head_loadings.links (top heads only)
  function edgeHeads(key) {
    var lh = get(S.viewer, ['link_heads', key]);
    if (lh && Array.isArray(lh.layers)) {
      return {
        source: 'all heads (viewer.link_heads)',
        layers: lh.layers.map(function (m, j) {
          var loads = (lh.loadings && lh.loadings[j]) || [];
          return {
            layer: m,
            heads: loads.map(function (v, h) { return { head: h, value: Number(v) }; }),
            bypass: lh.bypass && isNum(lh.bypass[j]) ? lh.bypass[j] : null
          };
        })
      };
    }
    var hlk = get(S.hl, ['links', key]);
    if (hlk && Array.isArray(hlk.heads)) {
      var byLayer = new Map();
      hlk.heads.forEach(function (h) {
        if (!byLayer.has(h.layer)) byLayer.set(h.layer, []);
        byLayer.get(h.layer).push({ head: h.head, value: Number(h.loading) });
      });
      if (hlk.bypass && !byLayer.has(hlk.bypass.layer)) byLayer.set(hlk.bypass.layer, []);
      var layers = Array.from(byLayer.keys()).sort(function (a, b) { return a - b; });
      return {
        source: 'top ' + hlk.heads.length + ' heads (head_loadings.links)',
        layers: layers.map(function (m) {
          return { layer: m, heads: byLayer.get(m), bypass: hlk.bypass && hlk.bypass.layer === m ? hlk.bypass.value : null };
        })
      };
    }
    return null;
  }

  function showEdgePanel(e) {
    var panel = $('edge-panel'), key = linkKey(e);
    var s = S.src[e], t = S.tgt[e];
    panel.hidden = false;
    panelHeader(panel, nodeLabel(s) + ' \u2192 ' + nodeLabel(t));
    panel.setAttribute('data-link', key);
    facts(panel, [['link', key], ['weight', fmt(S.w[e]), S.w[e] >= 0 ? 'pos-text' : 'neg-text'],
      ['positions', 'key ' + (S.nodes[s].ctx_idx | 0) + ' \u2192 query ' + (S.nodes[t].ctx_idx | 0)]]);
    var eh = edgeHeads(key);
    var q = S.nodes[t].ctx_idx | 0, kpos = S.nodes[s].ctx_idx | 0;
    var ctxHead = { q: q, k: kpos, link: key };
    if (!eh) {
      panel.appendChild(el('div', 'note', S.hl ? 'this edge crosses no attention layer or is not in the head loadings.' :
        'head loadings are absent from this document.'));
      return;
    }
    var best = null, maxAbs = 0;
    eh.layers.forEach(function (L) {
      L.heads.forEach(function (h) {
        if (Math.abs(h.value) > maxAbs) maxAbs = Math.abs(h.value);
        if (!best || Math.abs(h.value) > Math.abs(best.value)) best = { layer: L.layer, head: h.head, value: h.value };
      });
      if (isNum(L.bypass) && Math.abs(L.bypass) > maxAbs) maxAbs = Math.abs(L.bypass);
    });
    var topRow = el('div', 'score-line');
    topRow.appendChild(document.createTextNode('top head: '));
    if (best) {
      var th = el('span', 'top-head', headName(best.layer, best.head));
      th.setAttribute('data-layer', best.layer); th.setAttribute('data-head', best.head);
      th.onclick = function () { selectHead(best.layer, best.head, ctxHead); };
      topRow.appendChild(th);
      topRow.appendChild(document.createTextNode(' (' + fmt(best.value) + ')'));
    } else topRow.appendChild(document.createTextNode('none'));
    panel.appendChild(topRow);
    panel.appendChild(el('h4', null, 'head loadings by crossed layer'));
    panel.appendChild(el('div', 'note', eh.source + '; click a head for its attention and QK terms'));
    eh.layers.forEach(function (L) {
      var box = el('div', 'head-layer');
      box.appendChild(el('div', 'layer-title', 'layer ' + L.layer));
      L.heads.slice().sort(function (a, b) { return a.head - b.head; }).forEach(function (h) {
        var r = el('div', 'head-bar');
        r.setAttribute('data-layer', L.layer); r.setAttribute('data-head', h.head);
        r.setAttribute('data-value', String(h.value));
        r.appendChild(el('span', 'name', headName(L.layer, h.head)));
        r.appendChild(bar(h.value, maxAbs, 140));
        r.appendChild(el('span', 'val', fmt(h.value)));
        r.onclick = function () { selectHead(L.layer, h.head, ctxHead); };
        box.appendChild(r);
      });
      var b = el('div', 'bypass');
      b.appendChild(el('span', 'name', 'bypass'));
      if (isNum(L.bypass)) { b.appendChild(bar(L.bypass, maxAbs, 140)); b.appendChild(el('span', 'val', fmt(L.bypass))); b.setAttribute('data-value', String(L.bypass)); }
      else b.appendChild(el('span', 'val', 'n/a'));
      box.appendChild(b);
      panel.appendChild(box);
    });
    var pairs = get(S.qk, ['links', key]);
    if (Array.isArray(pairs) && pairs.length) {
      panel.appendChild(el('h4', null, 'QK terms exported for this edge'));
      var div = el('div', 'pair-links');
      pairs.forEach(function (pk) {
        var pr = get(S.qk, ['pairs', pk]);
        var b = el('button', null, pk);
        b.type = 'button';
        b.onclick = function () { if (pr) selectHead(pr.layer, pr.head, { q: pr.query_pos, k: pr.key_pos, link: key }); };
        div.appendChild(b);
      });
      panel.appendChild(div);
    }
  }

  function selectHead(m, h, context) {
    S.selHead = { layer: m, head: h, context: context || null };
    showHeadPanel(m, h, context || null);
    $('head-panel').scrollIntoView({ block: 'start' });
    Array.prototype.forEach.call(document.querySelectorAll('#edge-panel .head-bar'), function (r) {
      r.classList.toggle('selected', r.getAttribute('data-layer') === String(m) && r.getAttribute('data-head') === String(h));
    });
  }

  function showHeadPanel(m, h, context) {
    var panel = $('head-panel'), name = headName(m, h);
    panel.hidden = false;
    panelHeader(panel, 'head ' + name);
    panel.setAttribute('data-head', name);
    var total = get(S.hl, ['head_totals', m, h]);
    facts(panel, [['total |loading|', fmt(total)], ['context', context ? 'query ' + context.q + ' "' + tokenAt(context.q) + '", key ' + context.k + ' "' + tokenAt(context.k) + '"' : 'none (pick an edge)']]);
    heatmap(panel, name, context);
    var pairKey = context ? name + '@' + context.q + ':' + context.k : null;
    var pair = pairKey ? get(S.qk, ['pairs', pairKey]) : null;
    if (pair) qkView(panel, pair, pairKey);
    else {
      panel.appendChild(el('h4', null, 'QK terms'));
      panel.appendChild(el('div', 'note', !S.qk ? 'QK terms are absent from this document.' :
        (context ? 'no QK terms exported for ' + pairKey + '.' : 'pick an edge to see the QK terms of this head at its positions.')));
    }
    var others = [];
    if (S.qk && S.qk.pairs) {
      Object.keys(S.qk.pairs).forEach(function (k) { if (k.indexOf(name + '@') === 0 && k !== pairKey) others.push(k); });
    }
    if (others.length) {
      panel.appendChild(el('h4', null, 'other exported query:key pairs of ' + name));
      var div = el('div', 'pair-links');
      others.slice(0, 200).forEach(function (k) {
        var pr = S.qk.pairs[k];
        var b = el('button', null, k.slice(name.length + 1));
        b.type = 'button';
        b.onclick = function () { selectHead(m, h, { q: pr.query_pos, k: pr.key_pos, link: null }); };
        div.appendChild(b);
      });
      panel.appendChild(div);
    }
  }

  function heatmap(panel, name, context) {
    panel.appendChild(el('h4', null, 'attention pattern (rows: query, columns: key)'));
    var A = get(S.viewer, ['attention', name]);
    if (!Array.isArray(A) || !A.length) {
      panel.appendChild(el('div', 'note', 'attention patterns are absent from this document.'));
      return;
    }
    var P = A.length, cell = Math.max(2, Math.min(18, Math.floor(360 / P)));
    var c = el('canvas', 'heatmap');
    c.width = P * cell; c.height = P * cell;
    c.style.width = Math.min(260, P * cell) + 'px';
    var g = c.getContext('2d');
    for (var qi = 0; qi < P; qi++) {
      var rowA = A[qi] || [];
      for (var ki = 0; ki < P; ki++) {
        var v = Number(rowA[ki]) || 0;
        g.fillStyle = d3.interpolateGreys(Math.min(1, Math.max(0, v)) * 0.95 + 0.02);
        g.fillRect(ki * cell, qi * cell, cell, cell);
      }
    }
    if (context && context.q < P && context.k < P) {
      g.strokeStyle = '#e08214'; g.lineWidth = Math.max(1, cell / 5);
      g.strokeRect(context.k * cell + 0.5, context.q * cell + 0.5, cell - 1, cell - 1);
    }
    c.title = 'attention of ' + name;
    var tip = el('div', 'note', context && A[context.q] ? 'attention at (query ' + context.q + ', key ' + context.k + '): ' + fmt(Number(A[context.q][context.k]), 3) : '');
    c.onmousemove = function (ev) {
      var b = c.getBoundingClientRect(), sc = c.width / b.width;
      var ki = Math.floor((ev.clientX - b.left) * sc / cell), qi = Math.floor((ev.clientY - b.top) * sc / cell);
      if (qi >= 0 && qi < P && ki >= 0 && ki < P) tip.textContent = 'query ' + qi + ' "' + tokenAt(qi) + '" \u2192 key ' + ki + ' "' + tokenAt(ki) + '": ' + fmt(Number(A[qi][ki]), 3);
    };
    panel.appendChild(c);
    panel.appendChild(tip);
  }

  function qkView(panel, pair, pairKey) {
    panel.appendChild(el('h4', null, 'QK terms at ' + pairKey));
    var terms = Array.isArray(pair.terms) ? pair.terms : [];
    var sum = 0;
    terms.forEach(function (t) { sum += Number(t.value) || 0; });
    var rem = isNum(pair.remainder) ? pair.remainder : 0;
    var score = sum + rem;
    var line = el('div', 'score-line');
    line.appendChild(document.createTextNode('terms + remainder = '));
    var sEl = el('span', 'qk-score', fmt(score));
    sEl.setAttribute('data-value', String(score));
    line.appendChild(sEl);
    line.appendChild(document.createTextNode('   model score: '));
    var ms = isNum(pair.model_score) ? pair.model_score : null;
    var mEl = el('span', 'model-score', ms === null ? 'not in document' : fmt(ms));
    if (ms !== null) mEl.setAttribute('data-value', String(ms));
    line.appendChild(mEl);
    panel.appendChild(line);
    var notes = [];
    if (isNum(pair.score)) notes.push('exported score ' + fmt(pair.score));
    if (pair.soft_capped) notes.push('the model soft-caps this score with tanh afterwards');
    if (ms !== null && Math.abs(ms - score) > 1e-3 * Math.max(1, Math.abs(ms))) notes.push('differs from the model score by ' + fmt(score - ms));
    if (notes.length) panel.appendChild(el('div', 'note', notes.join('; ')));

    // the listed terms
    var table = el('table', 'qk');
    var head = el('tr');
    ['query component', 'key component', 'value'].forEach(function (h, j) { head.appendChild(el('th', j === 2 ? 'num' : null, h)); });
    table.appendChild(head);
    var maxAbs = 0;
    terms.forEach(function (t) { maxAbs = Math.max(maxAbs, Math.abs(Number(t.value) || 0)); });
    terms.forEach(function (t) {
      var tr = el('tr', 'qk-term');
      tr.setAttribute('data-value', String(t.value));
      tr.setAttribute('data-query', String(t.query)); tr.setAttribute('data-key', String(t.key));
      var a = el('td', null, componentLabel(t.query)); a.title = String(t.query);
      var b = el('td', null, componentLabel(t.key)); b.title = String(t.key);
      var v = el('td', 'num ' + (t.value >= 0 ? 'pos-text' : 'neg-text'), fmt(Number(t.value)));
      tr.appendChild(a); tr.appendChild(b); tr.appendChild(v);
      table.appendChild(tr);
    });
    var rr = el('tr', 'qk-remainder');
    rr.setAttribute('data-value', String(rem));
    rr.appendChild(el('td', null, 'remainder (all other terms)'));
    rr.appendChild(el('td'));
    rr.appendChild(el('td', 'num', fmt(rem)));
    table.appendChild(rr);
    panel.appendChild(table);

    // top positive / negative
    var pos = Array.isArray(pair.positive) ? pair.positive : terms.filter(function (t) { return t.value > 0; });
    var neg = Array.isArray(pair.negative) ? pair.negative : terms.filter(function (t) { return t.value < 0; });
    var sides = el('div', 'sides');
    sides.appendChild(termColumn('top positive pairs', pos, 'qk-positive'));
    sides.appendChild(termColumn('top negative pairs', neg, 'qk-negative'));
    panel.appendChild(sides);

    // marginals: query side and key side
    panel.appendChild(el('h4', null, 'marginals: query side | key side'));
    var qm = pair.query_marginals, km = pair.key_marginals;
    if (!Array.isArray(qm) && !Array.isArray(km)) {
      // from the listed terms only
      qm = marginalsFromTerms(terms, 'query'); km = marginalsFromTerms(terms, 'key');
      panel.appendChild(el('div', 'note', 'marginals are absent from this document: summed over the listed terms only.'));
    }
    var ms2 = el('div', 'sides');
    ms2.appendChild(marginalColumn('query components', qm || [], 'qk-query-marginal'));
    ms2.appendChild(marginalColumn('key components', km || [], 'qk-key-marginal'));
    panel.appendChild(ms2);

    // competition
    panel.appendChild(el('h4', null, 'competition'));
    var comp = pair.competition;
    if (comp && typeof comp === 'object') {
      panel.appendChild(el('div', 'note', 'score of this key minus the attention-weighted mean score over every key the query sees: ' +
        'positive = this key wins the softmax competition.'));
      var cl = el('div', 'score-line');
      cl.appendChild(document.createTextNode('score \u2212 \u03a3 p\u2c7c score\u2c7c = '));
      var cs = el('span', 'qk-competition-score', fmt(Number(comp.score)));
      cs.setAttribute('data-value', String(comp.score));
      cl.appendChild(cs);
      panel.appendChild(cl);
      if (Array.isArray(comp.terms) && comp.terms.length) panel.appendChild(termColumn('top competition terms', comp.terms, 'qk-competition-term'));
    } else {
      panel.appendChild(el('div', 'note', 'no competition view in this document.'));
    }
  }

  // one column of signed bars: QK terms (labelled "query · key") or marginals (one id)
  function valueColumn(title, list, cls, labelOf, idOf) {
    var box = el('div');
    box.appendChild(el('div', 'layer-title', title));
    var ul = el('ul');
    var maxAbs = 0;
    list.forEach(function (t) { maxAbs = Math.max(maxAbs, Math.abs(Number(t.value) || 0)); });
    if (!list.length) ul.appendChild(el('li', 'note', 'none'));
    list.forEach(function (t) {
      var li = el('li', cls);
      li.setAttribute('data-value', String(t.value));
      if (idOf) li.setAttribute('data-id', idOf(t));
      li.appendChild(bar(Number(t.value), maxAbs, 30));
      var names = labelOf(t);
      var lbl = el('span', 'lbl', names[0]);
      lbl.title = names[1];
      li.appendChild(lbl);
      li.appendChild(el('span', 'val', fmt(Number(t.value), 3)));
      ul.appendChild(li);
    });
    box.appendChild(ul);
    return box;
  }
  function termColumn(title, list, cls) {
    return valueColumn(title, list, cls, function (t) {
      return [componentLabel(t.query) + ' \u00b7 ' + componentLabel(t.key),
              String(t.query) + ' \u00b7 ' + String(t.key)];
    });
  }
  function marginalColumn(title, list, cls) {
    return valueColumn(title, list, cls, function (t) {
      return [componentLabel(t.id), String(t.id)];
    }, function (t) { return String(t.id); });
  }
  function marginalsFromTerms(terms, side) {
    var m = new Map();
    terms.forEach(function (t) { m.set(t[side], (m.get(t[side]) || 0) + (Number(t.value) || 0)); });
    return Array.from(m.entries()).map(function (kv) { return { id: kv[0], value: kv[1] }; })
      .sort(function (a, b) { return Math.abs(b.value) - Math.abs(a.value); });
  }

  function renderHeadsList() {
    var ol = $('heads-list');
    clear(ol);
    var totals = get(S.hl, ['head_totals']);
    if (!Array.isArray(totals)) {
      ol.appendChild(el('li', 'note', 'head loadings are absent from this document.'));
      return;
    }
    var all = [];
    totals.forEach(function (row, m) { (row || []).forEach(function (v, h) { all.push({ m: m, h: h, v: Number(v) }); }); });
    all.sort(function (a, b) { return Math.abs(b.v) - Math.abs(a.v); });
    var maxAbs = all.length ? Math.abs(all[0].v) : 1;
    all.slice(0, 500).forEach(function (x) {
      var li = el('li', 'head-item');
      li.setAttribute('data-layer', x.m); li.setAttribute('data-head', x.h);
      li.appendChild(el('span', 'name', headName(x.m, x.h) + ' '));
      li.appendChild(bar(x.v, maxAbs, 80));
      li.appendChild(el('span', 'val', ' ' + fmt(x.v, 3)));
      li.onclick = function () {
        var c = null;
        if (S.selEdge >= 0) c = { q: S.nodes[S.tgt[S.selEdge]].ctx_idx | 0, k: S.nodes[S.src[S.selEdge]].ctx_idx | 0, link: linkKey(S.selEdge) };
        selectHead(x.m, x.h, c);
      };
      ol.appendChild(li);
    });
  }

  // ---------------------------------------------------------------------- annotations
  function storageKey() { return 'tl-circuits:annotations:' + S.graphId; }
  function loadAnnotations() {
    var ann = get(S.viewer, ['annotations']) || {};
    var pinned = Array.isArray(ann.pinned) ? ann.pinned.map(String) : [];
    var sn = Array.isArray(ann.supernodes) ? ann.supernodes : [];
    if (S.mode === 'file') {
      try {
        var saved = window.localStorage && localStorage.getItem(storageKey());
        if (saved) {
          var o = JSON.parse(saved);
          if (Array.isArray(o.pinned)) pinned = o.pinned.map(String);
          if (Array.isArray(o.supernodes)) sn = o.supernodes;
        }
      } catch (e) { /* storage unavailable */ }
    }
    S.pinned = pinned.filter(function (id) { return S.idIndex.has(id); });
    S.supernodes = sn.filter(function (s) { return s && Array.isArray(s.members); })
      .map(function (s) { return { name: String(s.name || 'supernode'), members: s.members.map(String) }; });
    $('save-note').textContent = S.mode === 'file' ?
      'file mode: "save" keeps pins and supernodes in this browser (localStorage), not in the file.' :
      'served mode: "save" writes pins and supernodes to the server (POST /api/graph/<id>/annotations).';
    $('save-status').textContent = '';
    renderAnnotations();
  }
  function togglePin(id) {
    var j = S.pinned.indexOf(id);
    if (j >= 0) S.pinned.splice(j, 1); else S.pinned.push(id);
    renderAnnotations();
    requestDraw();
  }
  function renderAnnotations() {
    var ul = $('pinned-list');
    clear(ul);
    if (!S.pinned.length) ul.appendChild(el('li', 'note', 'no pinned nodes: select a node and press "pin".'));
    S.pinned.forEach(function (id) {
      var i = S.idIndex.get(id);
      var li = el('li', 'pinned-item');
      li.setAttribute('data-node', id);
      var lbl = el('span', 'lbl', i === undefined ? id : nodeLabel(i));
      lbl.title = id;
      lbl.onclick = function () { if (i !== undefined) selectNode(i); };
      li.appendChild(lbl);
      var b = el('button', 'small', 'unpin'); b.type = 'button';
      b.onclick = function () { togglePin(id); };
      li.appendChild(b);
      ul.appendChild(li);
    });
    var sl = $('supernode-list');
    clear(sl);
    S.supernodes.forEach(function (s, j) {
      var li = el('li', 'supernode-item');
      var lbl = el('span', 'lbl', s.name + ' (' + s.members.length + '): ' + s.members.map(function (id) {
        var i = S.idIndex.get(id); return i === undefined ? id : nodeLabel(i);
      }).join(', '));
      li.appendChild(lbl);
      var b = el('button', 'small', 'ungroup'); b.type = 'button';
      b.onclick = function () { S.supernodes.splice(j, 1); renderAnnotations(); };
      li.appendChild(b);
      sl.appendChild(li);
    });
    if (S.subgraph && S.doc) { buildSubgraph(); requestDraw(); }
  }
  function makeSupernode() {
    var name = $('supernode-name').value.trim();
    if (!S.pinned.length) { $('save-status').textContent = 'pin some nodes first'; return; }
    S.supernodes.push({ name: name || ('supernode ' + (S.supernodes.length + 1)), members: S.pinned.slice() });
    $('supernode-name').value = '';
    renderAnnotations();
  }
  function saveAnnotations() {
    var body = { pinned: S.pinned.slice(), supernodes: S.supernodes.map(function (s) { return { name: s.name, members: s.members.slice() }; }) };
    var status = $('save-status');
    if (S.mode === 'file') {
      try {
        localStorage.setItem(storageKey(), JSON.stringify(body));
        status.textContent = 'saved in this browser (localStorage)';
      } catch (e) { status.textContent = 'could not save: ' + e.message; }
      return Promise.resolve(body);
    }
    status.textContent = 'saving\u2026';
    return fetch('api/graph/' + encodeURIComponent(S.graphId) + '/annotations', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body)
    }).then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      status.textContent = 'saved to the server';
      return body;
    }).catch(function (e) { status.textContent = 'could not save: ' + e.message; });
  }

  // ------------------------------------------------------------- pinned subgraph view
  // Only the pinned nodes and the links among them. Each supernode (its pinned members;
  // a node in several supernodes goes to the first) is drawn as one labelled box at the
  // mean position of its members, with its members' links merged: weights summed per
  // (source group, target group), a node outside every supernode being its own group;
  // links inside one supernode are left out. The thresholds do not apply in this view.
  function buildSubgraph() {
    var pinnedIdx = [], pinnedSet = new Set();
    S.pinned.forEach(function (id) {
      var i = S.idIndex.get(id);
      if (i !== undefined && !pinnedSet.has(i)) { pinnedIdx.push(i); pinnedSet.add(i); }
    });
    var groupOf = new Map(), groups = [];
    S.supernodes.forEach(function (sn) {
      var members = [];
      sn.members.forEach(function (id) {
        var i = S.idIndex.get(String(id));
        if (i !== undefined && pinnedSet.has(i) && !groupOf.has(i)) { members.push(i); groupOf.set(i, groups.length); }
      });
      if (!members.length) return;
      var g = { name: sn.name, members: members, x: 0, y: 0 };
      members.forEach(function (i) { g.x += S.x[i]; g.y += S.y[i]; });
      g.x /= members.length; g.y /= members.length;
      groups.push(g);
    });
    var singles = pinnedIdx.filter(function (i) { return !groupOf.has(i); });
    var vis = new Uint8Array(S.N);
    singles.forEach(function (i) { vis[i] = 1; });
    var merged = new Map(), links = [];
    for (var e = 0; e < S.E; e++) {
      var s = S.src[e], t = S.tgt[e];
      if (!pinnedSet.has(s) || !pinnedSet.has(t)) continue;
      var gs = groupOf.has(s) ? groupOf.get(s) : -1, gt = groupOf.has(t) ? groupOf.get(t) : -1;
      if (gs >= 0 && gs === gt) continue;   // inside one supernode
      var key = (gs >= 0 ? 'g' + gs : 'n' + s) + '>' + (gt >= 0 ? 'g' + gt : 'n' + t);
      var m = merged.get(key);
      if (!m) {
        m = { gs: gs, s: s, gt: gt, t: t, w: 0, count: 0,
          x1: gs >= 0 ? groups[gs].x : S.x[s], y1: gs >= 0 ? groups[gs].y : S.y[s],
          x2: gt >= 0 ? groups[gt].x : S.x[t], y2: gt >= 0 ? groups[gt].y : S.y[t] };
        merged.set(key, m); links.push(m);
      }
      m.w += S.w[e]; m.count++;
    }
    var maxW = 0;
    links.forEach(function (l) { maxW = Math.max(maxW, Math.abs(l.w)); });
    S.sub = {
      singles: singles, groups: groups, links: links, vis: vis, maxW: maxW || 1,
      quadtree: d3.quadtree().x(function (d) { return S.x[d]; }).y(function (d) { return S.y[d]; }).addAll(singles)
    };
    var nMembers = 0;
    groups.forEach(function (g) { nMembers += g.members.length; });
    $('subgraph-note').textContent = 'pinned subgraph: ' + pinnedIdx.length + ' pinned nodes (' + singles.length + ' single, ' +
      nMembers + ' in ' + groups.length + ' supernode' + (groups.length === 1 ? '' : 's') + '), ' + links.length +
      ' links among them (merged per supernode); thresholds do not apply.';
  }
  function subEndName(gi, i) { return gi >= 0 ? 'supernode:' + S.sub.groups[gi].name : String(S.nodes[i].node_id); }
  function updateSubgraphControls() {
    var b = $('subgraph-toggle');
    b.textContent = S.subgraph ? 'show full graph' : 'show pinned subgraph';
    b.setAttribute('aria-pressed', S.subgraph ? 'true' : 'false');
    document.body.classList.toggle('subgraph-view', S.subgraph);
    if (!S.subgraph) $('subgraph-note').textContent = '';
  }
  function setSubgraph(on) {
    if (!S.doc) return;
    S.subgraph = !!on;
    S.hoverNode = -1;
    if (S.subgraph) { buildSubgraph(); fitSubgraph(); } else { S.sub = null; fitView(); }
    updateSubgraphControls();
    drawNow();
  }
  function fitSubgraph() {
    var xs = [], ys = [];
    S.sub.singles.forEach(function (i) { xs.push(S.x[i]); ys.push(S.y[i]); });
    S.sub.groups.forEach(function (g) { xs.push(g.x); ys.push(g.y); });
    if (!xs.length) { fitView(); return; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    var pad = 90;
    var k = Math.min((S.width - 2 * pad) / Math.max(1, x1 - x0), (S.height - 2 * pad) / Math.max(1, y1 - y0), 4);
    k = Math.max(0.02, k);
    var t = d3.zoomIdentity.translate(S.width / 2 - k * (x0 + x1) / 2, S.height / 2 - k * (y0 + y1) / 2).scale(k);
    d3.select(canvas).call(S.zoom.transform, t);
  }
  function drawSubLinks() {
    var k = S.transform.k, list = S.sub.links, maxW = S.sub.maxW;
    for (var i = 0; i < list.length; i++) {
      var l = list[i];
      var lvl = Math.sqrt(Math.abs(l.w) / maxW), c = l.w >= 0 ? COLORS.pos : COLORS.neg;
      ctx.strokeStyle = 'rgba(' + c[0] + ',' + c[1] + ',' + c[2] + ',' + (0.3 + 0.6 * lvl) + ')';
      ctx.lineWidth = (0.8 + 4 * lvl) / k;
      ctx.beginPath();
      ctx.moveTo(l.x1, l.y1);
      ctx.lineTo(l.x2, l.y2);
      ctx.stroke();
    }
  }
  function drawSubLabels() {
    var t = S.transform;
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    // the single nodes' labels
    ctx.fillStyle = '#333';
    S.sub.singles.forEach(function (i) {
      var lbl = nodeLabel(i);
      if (lbl.length > 40) lbl = lbl.slice(0, 39) + '\u2026';
      ctx.fillText(lbl, t.applyX(S.x[i]) + S.r[i] * t.k + 6, t.applyY(S.y[i]));
    });
    // supernodes: a pill at the mean position of the members
    ctx.font = '600 12px system-ui, sans-serif';
    S.sub.groups.forEach(function (g) {
      var text = g.name.length > 48 ? g.name.slice(0, 47) + '\u2026' : g.name;
      text += ' (' + g.members.length + ')';
      var w = ctx.measureText(text).width + 16, h = 22;
      var x = t.applyX(g.x) - w / 2, y = t.applyY(g.y) - h / 2, rad = h / 2;
      ctx.beginPath();
      ctx.moveTo(x + rad, y);
      ctx.arcTo(x + w, y, x + w, y + h, rad);
      ctx.arcTo(x + w, y + h, x, y + h, rad);
      ctx.arcTo(x, y + h, x, y, rad);
      ctx.arcTo(x, y, x + w, y, rad);
      ctx.closePath();
      ctx.fillStyle = '#fde7c4';
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = '#c26a00';
      ctx.stroke();
      ctx.fillStyle = '#1d1d1f';
      ctx.textAlign = 'center';
      ctx.fillText(text, x + w / 2, y + h / 2 + 0.5);
      ctx.textAlign = 'start';
    });
  }

  // ------------------------------------------------------------------------- events
  function init() {
    canvas = $('graph-canvas');
    ctx = canvas.getContext('2d');
    S.zoom = d3.zoom().scaleExtent([0.01, 60]).on('zoom', function (ev) {
      S.transform = ev.transform;
      requestDraw();
    });
    d3.select(canvas).call(S.zoom).on('dblclick.zoom', null);
    var downAt = null;
    canvas.addEventListener('pointerdown', function (ev) { downAt = [ev.clientX, ev.clientY]; });
    canvas.addEventListener('click', function (ev) {
      if (!S.doc) return;
      if (downAt && Math.hypot(ev.clientX - downAt[0], ev.clientY - downAt[1]) > 4) return; // a pan
      var tStart = performance.now(), t0 = ev.timeStamp, b = canvas.getBoundingClientRect();
      var sx = ev.clientX - b.left, sy = ev.clientY - b.top;
      var n = nodeAt(sx, sy);
      var what = 'none';
      if (n >= 0) { selectNode(n); what = 'node'; }
      else {
        var e = edgeAt(sx, sy);
        if (e >= 0) { selectEdge(e); what = 'edge'; }
      }
      void $('sidebar').offsetHeight; // include layout of the panel
      var rec = { what: what, ms: performance.now() - t0, handlerMs: performance.now() - tStart, paintMs: null };
      timings.lastClick = rec;
      // the graph redraw runs in the next frame (queued before this callback)
      requestAnimationFrame(function () { rec.paintMs = performance.now() - t0; });
    });
    canvas.addEventListener('mousemove', function (ev) {
      if (!S.doc) return;
      var b = canvas.getBoundingClientRect();
      var n = nodeAt(ev.clientX - b.left, ev.clientY - b.top);
      var tip = $('tooltip');
      if (n !== S.hoverNode) { S.hoverNode = n; requestDraw(); }
      canvas.classList.toggle('hovering', n >= 0);
      if (n < 0) { tip.hidden = true; return; }
      var nd = S.nodes[n];
      tip.textContent = nodeLabel(n) + '\n' + kindName(n) + ', layer ' + nd.layer + ', pos ' + nd.ctx_idx +
        ' "' + tokenAt(nd.ctx_idx | 0) + '"' + (isNum(nd.activation) ? '\nactivation ' + fmt(nd.activation) : '');
      tip.hidden = false;
      tip.style.left = Math.min(S.width - 200, ev.clientX - b.left + 12) + 'px';
      tip.style.top = (ev.clientY - b.top + 12) + 'px';
    });
    canvas.addEventListener('mouseleave', function () { $('tooltip').hidden = true; S.hoverNode = -1; requestDraw(); });
    $('node-threshold').addEventListener('input', function (ev) {
      S.nodeQ = Number(ev.target.value) / 100; updateThresholdLabels(); if (S.doc) { applyThresholds(); requestDraw(); }
    });
    $('edge-threshold').addEventListener('input', function (ev) {
      S.edgeQ = Number(ev.target.value) / 100; updateThresholdLabels(); if (S.doc) { applyThresholds(); requestDraw(); }
    });
    $('reset-view').onclick = function () { if (S.doc) { if (S.subgraph) fitSubgraph(); else fitView(); } };
    $('subgraph-toggle').onclick = function () { setSubgraph(!S.subgraph); };
    $('make-supernode').onclick = makeSupernode;
    $('save-annotations').onclick = saveAnnotations;
    window.addEventListener('resize', function () { if (S.doc) { resize(); requestDraw(); } });
    boot();
  }

  // -------------------------------------------------------- hooks for tests and scripts
  api.nodeIndex = function (id) { var i = S.idIndex.get(String(id)); return i === undefined ? -1 : i; };
  api.nodeScreenPosition = function (id) {
    var i = S.idIndex.get(String(id));
    if (i === undefined) return null;
    var b = canvas.getBoundingClientRect();
    return { x: b.left + S.transform.applyX(S.x[i]), y: b.top + S.transform.applyY(S.y[i]), visible: !!drawnNodes()[i] };
  };
  // what the graph view draws: the single nodes' ids, the supernodes (name, member ids)
  // and the links (in the subgraph view: merged, with source/target a node id or
  // "supernode:NAME" and the summed weight)
  api.visible = function () {
    if (S.subgraph && S.sub) {
      return {
        mode: 'subgraph',
        nodes: S.sub.singles.map(function (i) { return String(S.nodes[i].node_id); }),
        groups: S.sub.groups.map(function (g) {
          return { name: g.name, members: g.members.map(function (i) { return String(S.nodes[i].node_id); }), x: g.x, y: g.y };
        }),
        links: S.sub.links.length,
        linkList: S.sub.links.map(function (l) {
          return { source: subEndName(l.gs, l.s), target: subEndName(l.gt, l.t), weight: l.w, count: l.count };
        })
      };
    }
    var ids = [];
    for (var i = 0; i < S.N; i++) if (S.visibleNode[i]) ids.push(String(S.nodes[i].node_id));
    return { mode: 'full', nodes: ids, groups: [], links: S.drawnEdges ? S.drawnEdges.length : 0, linkList: null };
  };
  api.toggleSubgraph = function (on) { setSubgraph(on === undefined ? !S.subgraph : !!on); return S.subgraph; };
  api.nodeInfo = function (id) {
    var i = S.idIndex.get(String(id));
    if (i === undefined) return null;
    return { importance: S.importance[i], rank: S.nodeRank[i], r: S.r[i], visible: !!S.visibleNode[i] };
  };
  api.importanceSource = function () { return S.importanceSource; };
  api.counts = function () {
    return { nodes: S.N, visibleNodes: S.nVisible, links: S.E, drawnEdges: S.drawnEdges ? S.drawnEdges.length : 0 };
  };
  api.selectNode = function (id) { var i = S.idIndex.get(String(id)); if (i !== undefined) selectNode(i); return i !== undefined; };
  api.selectLink = function (source, target) {
    var s = S.idIndex.get(String(source));
    if (s === undefined) return false;
    var list = edgesOf(s, false);
    for (var j = 0; j < list.length; j++) if (String(S.nodes[S.tgt[list[j]]].node_id) === String(target)) { selectEdge(list[j]); return true; }
    return false;
  };
  api.selectHead = function (m, h, q, k) { selectHead(m, h, q === undefined ? null : { q: q, k: k, link: null }); };
  api.setThresholds = function (nodeQ, edgeQ) {
    if (nodeQ !== null && nodeQ !== undefined) { S.nodeQ = nodeQ; $('node-threshold').value = nodeQ * 100; }
    if (edgeQ !== null && edgeQ !== undefined) { S.edgeQ = edgeQ; $('edge-threshold').value = edgeQ * 100; }
    updateThresholdLabels(); applyThresholds(); drawNow();
  };
  api.save = function () { return saveAnnotations(); };
  api.annotations = function () { return { pinned: S.pinned.slice(), supernodes: S.supernodes.slice() }; };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
