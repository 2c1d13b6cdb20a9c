/* EdgeOpt charts, drawn with the vendored Chart.js (static/vendor/chartjs, MIT).
 *
 * results(): accuracy against a chosen x metric (size, host latency, estimated device latency
 *   or energy), each result in its own colour and shape with its name beside it (names that
 *   would overlap another are left to the legend), the Pareto front as a dashed line, the
 *   recommended result ringed, constraint limits as labelled lines.
 * monitor(): the same plot, growing as techniques finish, and the loss curve of each
 *   fine-tune, both fed from the live panel the WebSocket swaps in.
 * Without JavaScript the pages' tables carry every number; the charts are an addition.
 */
(function () {
  "use strict";

  var COLOURS = ["#1b6ac9", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#0c8599", "#c2255c", "#5c940d"];
  var SHAPES = ["circle", "triangle", "rect", "rectRot", "star", "crossRot", "rectRounded", "cross"];
  var BASELINE_COLOUR = "#495057";

  function styleFor(label, index) {
    if (label === "baseline") return {colour: BASELINE_COLOUR, shape: "circle"};
    return {colour: COLOURS[index % COLOURS.length], shape: SHAPES[index % SHAPES.length]};
  }

  function boxesOverlap(a, b) {
    return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
  }

  /* Names beside the points: for each point try right, left, above, below; the first place
   * that overlaps neither another name nor a point and stays inside the plot wins. A name
   * with no free place is not drawn (the legend and the tooltip still name it). */
  var pointLabels = {
    id: "edgeoptPointLabels",
    afterDatasetsDraw: function (chart) {
      var ctx = chart.ctx, area = chart.chartArea, placed = [], points = [];
      chart.data.datasets.forEach(function (dataset, i) {
        if (!dataset.pointName || !chart.isDatasetVisible(i)) return;
        chart.getDatasetMeta(i).data.forEach(function (element) {
          points.push({x: element.x - 6, y: element.y - 6, w: 12, h: 12, name: dataset.pointName, el: element});
        });
      });
      ctx.save();
      ctx.font = "12px system-ui, sans-serif";
      ctx.fillStyle = "#212529";
      ctx.textBaseline = "middle";
      points.forEach(function (point) {
        var width = ctx.measureText(point.name).width, height = 14, x = point.el.x, y = point.el.y;
        var candidates = [
          {x: x + 9, y: y - height / 2}, {x: x - 9 - width, y: y - height / 2},
          {x: x - width / 2, y: y - 10 - height}, {x: x - width / 2, y: y + 10}
        ];
        for (var c = 0; c < candidates.length; c++) {
          var box = {x: candidates[c].x, y: candidates[c].y, w: width, h: height};
          var inside = box.x >= area.left && box.x + box.w <= area.right && box.y >= area.top && box.y + box.h <= area.bottom;
          var free = inside && !placed.some(function (other) { return boxesOverlap(box, other); }) &&
            !points.some(function (other) { return other !== point && boxesOverlap(box, other); });
          if (free) {
            placed.push(box);
            ctx.fillText(point.name, box.x, box.y + height / 2);
            break;
          }
        }
      });
      ctx.restore();
    }
  };

  /* Constraint limits: a dashed line across the plot at the limit, with its name. */
  var limitLines = {
    id: "edgeoptLimits",
    afterDatasetsDraw: function (chart, args, options) {
      var ctx = chart.ctx, area = chart.chartArea;
      ctx.save();
      ctx.strokeStyle = "#c92a2a";
      ctx.fillStyle = "#c92a2a";
      ctx.setLineDash([6, 4]);
      ctx.font = "11px system-ui, sans-serif";
      (options.lines || []).forEach(function (line) {
        var scale = chart.scales[line.axis];
        if (!scale) return;
        var at = scale.getPixelForValue(line.value);
        ctx.beginPath();
        if (line.axis === "x") {
          if (at < area.left || at > area.right) return;
          ctx.moveTo(at, area.top); ctx.lineTo(at, area.bottom);
          ctx.stroke();
          ctx.fillText(line.label, Math.min(at + 4, area.right - ctx.measureText(line.label).width), area.top + 10);
        } else {
          if (at < area.top || at > area.bottom) return;
          ctx.moveTo(area.left, at); ctx.lineTo(area.right, at);
          ctx.stroke();
          ctx.fillText(line.label, area.left + 4, at - 5);
        }
      });
      ctx.restore();
    }
  };

  function axisRange(values, limit, fromZero) {
    var all = values.concat(limit === undefined ? [] : [limit]);
    var low = Math.min.apply(null, all), high = Math.max.apply(null, all);
    var pad = (high - low) * 0.08 || Math.abs(high) * 0.05 || 1;
    return {min: fromZero ? 0 : low - pad, max: high + pad};
  }

  function scatterConfig(data, axis) {
    var points = data.points.filter(function (p) { return p[axis] !== null && p[axis] !== undefined; });
    var front = (data.fronts && data.fronts[axis]) || [];
    var byLabel = {};
    points.forEach(function (p) { byLabel[p.label] = p; });
    var datasets = points.map(function (p, i) {
      var style = styleFor(p.label, i), recommended = p.label === data.recommended;
      var onFront = front.indexOf(p.label) >= 0;  // marked even when the front is a single point
      var notes = [recommended ? "recommended" : "", onFront ? "Pareto front" : ""].filter(Boolean);
      return {
        label: p.label + (notes.length ? " (" + notes.join(", ") + ")" : ""), pointName: p.label,
        data: [{x: p[axis], y: p.accuracy}],
        backgroundColor: style.colour, borderColor: recommended || onFront ? "#212529" : style.colour,
        pointStyle: style.shape, pointRadius: recommended ? 9 : 6, pointHoverRadius: 9,
        borderWidth: recommended ? 3 : (onFront ? 2 : 1)
      };
    });
    if (front.length > 1) {
      datasets.push({
        label: "Pareto front", data: front.map(function (name) { return {x: byLabel[name][axis], y: byLabel[name].accuracy}; }),
        showLine: true, borderColor: "#868e96", borderDash: [5, 4], pointRadius: 0, fill: false, order: 10
      });
    }
    var limits = data.limits || {}, lines = [];
    if (limits[axis] !== undefined) lines.push({axis: "x", value: limits[axis], label: "limit " + limits[axis]});
    if (limits.accuracy !== undefined) lines.push({axis: "y", value: limits.accuracy, label: "lowest accuracy allowed " + limits.accuracy + "%"});
    var xs = points.map(function (p) { return p[axis]; }), ys = points.map(function (p) { return p.accuracy; });
    var xRange = axisRange(xs, limits[axis], true), yRange = axisRange(ys, limits.accuracy, false);
    return {
      type: "scatter",
      data: {datasets: datasets},
      plugins: [pointLabels, limitLines],
      options: {
        animation: false, maintainAspectRatio: false,
        scales: {
          x: {title: {display: true, text: data.axes[axis]}, min: xRange.min, max: xRange.max,
              ticks: {maxTicksLimit: 8}},
          y: {title: {display: true, text: "Top-1 accuracy (%)"}, min: yRange.min, max: Math.min(yRange.max, 100.5),
              ticks: {maxTicksLimit: 7}}
        },
        plugins: {
          legend: {position: "bottom", labels: {usePointStyle: true, boxWidth: 8}},
          tooltip: {callbacks: {label: function (item) {
            return item.dataset.label + ": " + item.parsed.y + "%, " + item.parsed.x + " (" + data.axes[axis] + ")";
          }}},
          edgeoptLimits: {lines: lines}
        }
      }
    };
  }

  function readJSON(id) {
    var node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  function results() {
    var data = readJSON("chart-data"), canvas = document.getElementById("results-chart");
    var select = document.getElementById("chart-axis");
    if (!data || !canvas || !window.Chart) return;
    var chart = new Chart(canvas, scatterConfig(data, select ? select.value : data.default_axis));
    if (select) {
      select.addEventListener("change", function () {
        chart.destroy();
        chart = new Chart(canvas, scatterConfig(data, select.value));
      });
    }
  }

  var LIVE_AXES = {size: "Download size (KB)"};

  function monitor() {
    var resultsCanvas = document.getElementById("live-results-chart");
    var lossCanvas = document.getElementById("live-loss-chart");
    if (!window.Chart || !resultsCanvas || !lossCanvas) return;
    var resultsChart = null, shown = "";
    var losses = {}, order = [], lastSeq = -1;
    var lossChart = new Chart(lossCanvas, {
      type: "line", data: {datasets: []},
      options: {
        animation: false, maintainAspectRatio: false, parsing: false,
        scales: {x: {type: "linear", title: {display: true, text: "Progress message (fine-tune steps, in order)"}, ticks: {maxTicksLimit: 8, precision: 0}},
                 y: {title: {display: true, text: "Training loss"}, ticks: {maxTicksLimit: 6}}},
        plugins: {legend: {position: "bottom"}}
      }
    });

    function update() {
      var panel = document.getElementById("progress-panel");
      if (!panel) return;
      var seq = Number(panel.dataset.seq || 0);
      if (seq === lastSeq) return;
      lastSeq = seq;
      var points = readJSON("live-points") || [];
      var key = JSON.stringify(points);
      if (points.length > 1 && key !== shown) {
        shown = key;
        if (resultsChart) resultsChart.destroy();
        resultsChart = new Chart(resultsCanvas, scatterConfig({points: points, axes: LIVE_AXES, fronts: {}, limits: {}}, "size"));
      }
      var metrics = readJSON("live-metrics") || {}, technique = panel.dataset.technique;
      if (technique && typeof metrics.loss === "number") {
        if (!losses[technique]) {
          losses[technique] = [];
          order.push(technique);
        }
        losses[technique].push(metrics.loss);
        lossChart.data.datasets = order.map(function (name, i) {
          return {label: name, data: losses[name].map(function (y, x) { return {x: x + 1, y: y}; }),
                  borderColor: COLOURS[(i + 1) % COLOURS.length], pointRadius: 0, borderWidth: 2};
        });
        lossChart.update();
      }
    }

    update();
    document.body.addEventListener("htmx:oobAfterSwap", update);
    document.body.addEventListener("htmx:wsAfterMessage", update);
  }

  window.EdgeOptCharts = {results: results, monitor: monitor};
})();
