/* The setup form, improved when JavaScript runs (without it every field shows and the
 * server checks everything): pretrained models of the chosen framework only, fields shown
 * only where they apply, the error summary focused after a refused post. */
(function () {
  "use strict";
  var form = document.querySelector("form.setup");
  if (!form) return;
  var framework = form.querySelector("#id_framework");
  var model = form.querySelector("#id_pretrained_model");

  function filterModels() {
    if (!framework || !model) return;
    var wanted = model.value;
    model.querySelectorAll("optgroup").forEach(function (group) {
      var match = group.dataset.framework === framework.value;
      group.disabled = !match;
      group.hidden = !match;
    });
    var selected = model.options[model.selectedIndex];
    if (selected && selected.parentNode.disabled) {
      var same = model.querySelector('optgroup[data-framework="' + framework.value + '"] option[value="' + wanted + '"]');
      if (same) same.selected = true; else model.value = "";
    }
  }

  function showWhereTheyApply() {
    form.querySelectorAll("[data-show-if]").forEach(function (box) {
      if (box.dataset.showIf === "fine_tunes") {  // the epochs budget: only with a fine-tune ticked
        box.hidden = !form.querySelector('input[name=techniques][data-fine-tunes=true]:checked');
        return;
      }
      var rule = box.dataset.showIf.split("="), source = form.elements[rule[0]];
      box.hidden = source ? source.value !== rule[1] : false;
    });
  }

  function update() {
    filterModels();
    showWhereTheyApply();
  }

  form.addEventListener("change", update);
  update();
  var summary = document.getElementById("error-summary");
  if (summary) summary.focus();
})();
