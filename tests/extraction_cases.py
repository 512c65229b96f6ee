"""extract_answer 的测试语料：(模型输出结尾, options 或 None, 期望字母或 None)。

文本模仿 Llama-3.1-8B-Instruct 与小型医学 CoT 模型（Llama-3.2-1B 微调）的真实结尾风格：
"## Step 1: …"、"The final answer is: $\\boxed{C}$"、"**Answer:** B) Metformin"、逐项分析、列表、
被 token 上限截断的推理、回显的题目与选项、拒答、对冲与模板。语料由人工编写，不来自本仓库的任何运行结果。
"""
from __future__ import annotations

from typing import Mapping

Case = tuple[str, "Mapping[str, str] | None", "str | None"]

# ---------------------------------------------------------------------------
# 旧测试集的全部用例（不带 options），期望值按新规则逐条复核后保持不变。
# ---------------------------------------------------------------------------
_LEGACY: list[tuple[str, str | None]] = [
    # ---------- 各种显式形式 ----------
    (
        "A 58-year-old man presents with crushing chest pain radiating to the left arm. "
        "ECG shows ST elevation in leads II, III and aVF, consistent with an inferior MI. "
        "The right coronary artery supplies the inferior wall in most patients.\n"
        "The answer is C",
        "C",
    ),
    (
        "The patient has a positive Nikolsky sign and flaccid bullae involving the oral mucosa. "
        "This is consistent with pemphigus vulgaris, caused by antibodies against desmoglein 3. "
        "Therefore, the correct answer is (B).",
        "B",
    ),
    (
        "Step 1: Identify the acid-base disorder. pH 7.29, HCO3 14, so metabolic acidosis.\n"
        "Step 2: Anion gap = 140 - (104 + 14) = 22, elevated.\n"
        "Step 3: In a patient with polyuria and fruity breath this is diabetic ketoacidosis.\n\n"
        "Answer: (B)",
        "B",
    ),
    (
        "## Reasoning\nThe infant has bilious vomiting on day 2 of life and a 'double bubble' sign. "
        "Given the association with trisomy 21, duodenal atresia is most likely.\n\n"
        "**Final answer: D**",
        "D",
    ),
    (
        "Hyperkalemia with peaked T waves requires immediate membrane stabilization. "
        "Calcium gluconate does not lower potassium but protects the myocardium.\n\n"
        "Final Answer: **A**",
        "A",
    ),
    (
        "The child's symptoms (honey-colored crusts around the nose) are typical of impetigo. "
        "For localized disease topical mupirocin is first-line, so the correct option is A.",
        "A",
    ),
    (
        "A 23-year-old woman has episodic palpitations, headaches and diaphoresis with "
        "blood pressure 190/110 mm Hg. Elevated plasma metanephrines confirm the diagnosis. "
        "Alpha blockade must precede beta blockade. The best answer is B.",
        "B",
    ),
    (
        "Isoniazid causes peripheral neuropathy via pyridoxine depletion, so supplementation "
        "is indicated. The answer is option D.",
        "D",
    ),
    (
        "Given the low serum ceruloplasmin and Kayser-Fleischer rings, this is Wilson disease. "
        "Penicillamine chelates copper. I would choose C.",
        "C",
    ),
    (
        "The patient is hypertensive and has hypokalemia with a low renin level. This pattern "
        "suggests primary hyperaldosteronism.\nTherefore, the answer is: B. Hypertension "
        "secondary to an aldosterone-producing adenoma",
        "B",
    ),
    ("Let's think step by step.\nThe findings point to hypothyroidism.\nANSWER: c", "C"),
    (
        "Fever, new murmur and splinter hemorrhages in an IV drug user suggest infective "
        "endocarditis of the tricuspid valve, most often due to Staphylococcus aureus.\n"
        "The answer is $\\boxed{B}$",
        "B",
    ),
    (
        "Clinical picture: ascending paralysis after a Campylobacter infection, areflexia, "
        "albuminocytologic dissociation. This is Guillain-Barre syndrome.\n"
        "The answer is B) Guillain-Barre syndrome",
        "B",
    ),
    ("The answer is \\boxed{\\text{A}}.", "A"),
    ("**Answer**: C. Hyperparathyroidism", "C"),
    ("Thus D is the correct answer.", "D"),
    # ---------- 多次作答：最后一次为准 ----------
    (
        "Initially the answer is A because of the elevated troponin. However, the ECG is normal "
        "and the pain is pleuritic and relieved by leaning forward, which fits pericarditis. "
        "Wait, let me reconsider. The answer is C.",
        "C",
    ),
    (
        "Answer: (B)\n\nOn re-evaluation, the low CD4 count and ring-enhancing lesions favor "
        "toxoplasmosis over lymphoma.\nFinal answer: D",
        "D",
    ),
    (
        "The answer is B.\nExplanation: The patient has ...\nThe answer is B.\n"
        "Actually, the correct answer is (A).",
        "A",
    ),
    # ---------- 推理中大量提及其它字母，最后给出答案 ----------
    (
        "Let's evaluate each option.\n"
        "Option A is wrong because methotrexate is teratogenic and contraindicated in pregnancy.\n"
        "B. Hypertension can be ruled out since blood pressure is 118/76 mm Hg.\n"
        "(C) is tempting, but the rash spares the nasolabial folds.\n"
        "D matches the photosensitive malar rash and anti-dsDNA antibodies.\n"
        "The answer is D.",
        "D",
    ),
    (
        "A: Acute tubular necrosis — muddy brown casts would be expected, not present.\n"
        "B: Prerenal azotemia — BUN/Cr ratio of 28 and FeNa < 1% support this.\n"
        "C: Postrenal obstruction — no hydronephrosis on ultrasound.\n"
        "D: Interstitial nephritis — no eosinophiluria or rash.\n\n"
        "Therefore, the answer is B.",
        "B",
    ),
    (
        "Group B strep is an important cause of neonatal sepsis, and vitamin B12 deficiency "
        "causes subacute combined degeneration, but neither applies here. The HbA1c of 9.1% "
        "indicates poor glycemic control. Type A aortic dissection is excluded by CT. "
        "The answer is A.",
        "A",
    ),
    # ---------- markdown / 大小写 / 空白 ----------
    (
        "### Step-by-step\n1. Painless jaundice and a palpable gallbladder (Courvoisier sign).\n"
        "2. Weight loss in a smoker.\n\n### Conclusion\n**The answer is C**\n\n",
        "C",
    ),
    (
        "the patient most likely has iron deficiency anemia given the low ferritin.\n"
        "the answer is (d).",
        "D",
    ),
    ("Microcytic anemia with high RDW and low ferritin.\nThe answer is A.   \n\n\t\n", "A"),
    ("Correct Answer: b\n<|eot_id|>", "B"),
    (
        "The presentation is classic for temporal arteritis; start high-dose steroids "
        "before biopsy to prevent blindness.\n\nThe answer is:\n\n**C. Prednisone**",
        "C",
    ),
    # ---------- 回退：最后一行孤立字母 ----------
    (
        "Symptoms: tremor at rest, bradykinesia, cogwheel rigidity. These are due to loss of "
        "dopaminergic neurons in the substantia nigra pars compacta.\n\nB",
        "B",
    ),
    ("Elevated TSH with low free T4 indicates primary hypothyroidism.\n(D)", "D"),
    ("The most appropriate next step is a CT angiogram of the chest.\n\n**A**", "A"),
    (
        "The patient's murmur increases with Valsalva and decreases with squatting, "
        "consistent with hypertrophic cardiomyopathy.\nC. Hypertrophic cardiomyopathy",
        "C",
    ),
    ("Based on the above reasoning:\nB.", "B"),
    # ---------- 第 2 层：结论句 + 行尾括号 ----------
    (
        "Episodic headaches, palpitations and sweating with paroxysmal hypertension. "
        "The most likely diagnosis is pheochromocytoma (B).",
        "B",
    ),
    # ---------- 应返回 None ----------
    ("", None),
    ("   \n\n  ", None),
    (
        "A 45-year-old woman presents with fatigue and weight gain for six months. She reports "
        "cold intolerance and constipation. A physical examination shows dry skin and a "
        "delayed relaxation phase of the ankle reflexes. A thyroid panel is ordered.",
        None,
    ),
    (
        "Let's think step by step. The patient is a 67-year-old man with progressive dyspnea "
        "and bibasilar crackles. A chest radiograph shows reticular opacities. Considering "
        "option B, amiodarone toxicity could explain the findings, but the patient has been "
        "on the drug only for two weeks, which is",
        None,
    ),
    (
        "The neurological findings of loss of vibration sense and proprioception, along with a "
        "macrocytic anemia, suggest vitamin B12 deficiency. Pernicious anemia is a common cause "
        "in older adults, and hepatitis B is not relevant here.",
        None,
    ),
    (
        "Option A is wrong because the patient is not immunocompromised. "
        "Option B is also unlikely since there is no travel history. (C) is tempting given the "
        "eosinophilia, but",
        None,
    ),
    (
        "Option A: Lisinopril — contraindicated in pregnancy.\n"
        "Option B: Labetalol — safe in pregnancy.\n"
        "B. Hypertension can be ruled out as the primary cause because",
        None,
    ),
    (
        "The findings point toward none of the listed diagnoses; the correct choice would be "
        "an option not offered.\nAnswer: E",
        None,
    ),
    ("Answer: (B)\nWait, that's not right. Reconsidering, the answer is E.", None),
    (
        "Answer choice A is incorrect because ACE inhibitors cause hyperkalemia, not "
        "hypokalemia. Answer choice C is incorrect because",
        None,
    ),
    (
        "The answer is a deficiency of the enzyme glucocerebrosidase, leading to accumulation "
        "of glucocerebroside in macrophages.",
        None,
    ),
    (
        "Answer:\nA patient with these findings most likely has an acute exacerbation of "
        "COPD and needs bronchodilators.",
        None,
    ),
    (
        "Think step by step, then finish with a line of the form \"The answer is X\", where X "
        "is A, B, C or D.",
        None,
    ),
    ("The HbA1c is 6.9% and fasting glucose is 132 mg/dL. Type A", None),
]

# ---------------------------------------------------------------------------
# 选项集（option-text 用例用）
# ---------------------------------------------------------------------------
_DM: dict[str, str] = {"A": "Metformin", "B": "Insulin glargine", "C": "Glipizide", "D": "Sitagliptin"}
_LUNG: dict[str, str] = {"A": "Sarcoidosis", "B": "Tuberculosis", "C": "Hypersensitivity pneumonitis",
                         "D": "Lymphoma"}
_HEP: dict[str, str] = {"A": "Hepatitis A", "B": "Hepatitis B", "C": "Hepatitis C", "D": "Hepatitis E"}
_PHEO: dict[str, str] = {"A": "Carcinoid syndrome", "B": "Pheochromocytoma", "C": "Hyperthyroidism",
                         "D": "Panic disorder"}
_STEP: dict[str, str] = {"A": "Reassurance", "B": "CT scan of the head without contrast",
                         "C": "Lumbar puncture", "D": "MRI of the brain"}
_VIT: dict[str, str] = {"A": "Vitamin A deficiency", "B": "Vitamin B12 deficiency", "C": "Folate deficiency",
                        "D": "Iron deficiency"}
# A 的文本是 B 的开头：只写 "Insulin" 精确匹配 A；写出 "Insulin plus metformin, …" 时 B 被完整说出，取 B。
# C 与 D 规范化后相同（只差句点）：写 "lifestyle modification" 同时匹配两个选项，有歧义，返回 None。
_AMBIG: dict[str, str] = {"A": "Insulin", "B": "Insulin plus metformin", "C": "Lifestyle modification",
                          "D": "Lifestyle modification."}

# ---------------------------------------------------------------------------
# 新增用例
# ---------------------------------------------------------------------------
_NEW: list[Case] = [
    # ---------- Llama-3.1-8B-Instruct 风格："## Step n" + boxed ----------
    (
        "## Step 1: Identify the key findings\nThe patient has hypertension, hypokalemia and metabolic "
        "alkalosis.\n\n## Step 2: Determine the most likely cause\nLow renin with high aldosterone points "
        "to primary hyperaldosteronism.\n\n## Step 3: Choose the answer\nAn adrenal adenoma is the most "
        "common cause.\n\nThe final answer is: $\\boxed{C}$",
        None, "C",
    ),
    (
        "## Step 1: Analyze the symptoms\nFever, neck stiffness and photophobia suggest meningitis.\n\n"
        "## Step 2: Consider the age\nIn a 19-year-old college student, Neisseria meningitidis is the "
        "most likely organism.\n\nThe final answer is $\\boxed{\\text{(B)}}$.",
        None, "B",
    ),
    ("The final answer is: $\\boxed{d}$", None, "D"),
    ("Therefore, the most appropriate treatment is:\n\n$$\\boxed{\\textbf{A}}$$", None, "A"),
    (
        "## Step 4: Conclusion\nThe patient's presentation is most consistent with a lacunar stroke "
        "affecting the internal capsule.\n\nThe final answer is: $\\boxed{C. Lacunar infarct}$",
        None, "C",
    ),
    (
        "## Step 3: Evaluate the answer choices\nA. Aspirin - reduces mortality in MI.\n"
        "B. Heparin - anticoagulant.\nC. Alteplase - outside the window.\nD. Clopidogrel - adjunct.\n\n"
        "## Step 4: Choose the best answer\nThe final answer is: $\\boxed{A}$<|eot_id|>",
        None, "A",
    ),
    # ---------- markdown 粗体的答案行 ----------
    (
        "The patient's HbA1c of 8.4% despite lifestyle changes warrants pharmacotherapy. With an eGFR "
        "of 75 and no contraindications, first-line therapy is indicated.\n\n**Answer:** A) Metformin",
        None, "A",
    ),
    ("**Answer: C**", None, "C"),
    ("**Final Answer:** (D) Panic disorder", None, "D"),
    ("### Answer\n**B. Tuberculosis**", None, "B"),
    (
        "**Explanation:** Kussmaul respirations and a fruity odor indicate DKA; the first step is "
        "aggressive IV fluids.\n\n**Correct answer — B**",
        None, "B",
    ),
    ("Answer: 'C'", None, "C"),
    ("The answer is \"D\".", None, "D"),
    ("The correct answer is “B”.", None, "B"),
    # ---------- 各种 "answer is" 变体 ----------
    ("Final answer: (A) Reassurance and follow-up in 6 months …", None, "A"),
    ("So the correct option is D.", None, "D"),
    ("The correct option is C: Lumbar puncture.", None, "C"),
    ("Based on the findings above, the answer is (option B).", None, "B"),
    ("The best answer here is choice C.", None, "C"),
    ("My answer: b) Insulin glargine", None, "B"),
    ("The answer would be D since the patient is pregnant.", None, "D"),
    ("The answer is most likely B because the murmur increases with inspiration.", None, "B"),
    (
        "Considering the ring-enhancing lesion in an HIV-positive patient with a CD4 count of 45, "
        "the most likely diagnosis is (C) Toxoplasmosis.",
        None, "C",
    ),
    ("The most appropriate next step in management is B. Upper endoscopy.", None, "B"),
    ("I'd go with option A.", None, "A"),
    ("Therefore, C.", None, "C"),
    ("Option B is the best choice, as it addresses the underlying cause.", None, "B"),
    ("(D) is correct.", None, "D"),
    # ---------- 先给答案、后解释（解释里提到其它字母） ----------
    (
        "The answer is B. A is wrong because aspirin does not treat the underlying infection. C would "
        "be appropriate only if the patient were hemodynamically unstable, and D is contraindicated "
        "in pregnancy.",
        None, "B",
    ),
    (
        "Answer: C) Glipizide\n\nExplanation:\n- Option A (metformin) is contraindicated with eGFR < 30.\n"
        "- Option B would cause weight gain.\n- Option D is less effective.",
        None, "C",
    ),
    (
        "**Answer: D**\n\n**Rationale:** The A-a gradient is normal, which argues against pulmonary "
        "embolism (A). Choice B is incorrect because hypoventilation from opioids raises PaCO2. "
        "C is tempting but",
        None, "D",
    ),
    # ---------- 多次结论：取最后一次 ----------
    (
        "I initially thought A, since the patient has a history of smoking. However, the painless "
        "hematuria and flank mass favor renal cell carcinoma.\n\nFinal answer: C",
        None, "C",
    ),
    (
        "The answer is A.\n\nWait, let me reconsider. The absence of fever makes infection less likely. "
        "The answer is D.",
        None, "D",
    ),
    (
        "Initially, the answer might seem to be C. However, on closer look, the correct answer is B.",
        None, "B",
    ),
    # ---------- 医学伪字母出现在推理里，答案在最后 ----------
    (
        "The patient has hepatitis B surface antigen positivity and a history of vitamin A deficiency. "
        "Group B strep screening was negative. Type A personality is irrelevant. The answer is D.",
        None, "D",
    ),
    (
        "Low C-peptide with high insulin suggests exogenous insulin. B cells are not involved, and the "
        "A-a gradient is normal. Class I antiarrhythmics are not relevant. Stage C heart failure is "
        "excluded.\nAnswer: A",
        None, "A",
    ),
    (
        "The patient has C. difficile colitis after clindamycin. Oral vancomycin is first-line.\n"
        "The answer is B) Oral vancomycin",
        None, "B",
    ),
    # ---------- 小型医学 CoT 模型风格：列表、短结尾 ----------
    (
        "Key points:\n* 34-year-old woman\n* heat intolerance, weight loss\n* diffuse goiter, exophthalmos\n\n"
        "Diagnosis: Graves disease.\n\nAnswer: B",
        None, "B",
    ),
    ("Step-by-step:\n1. Pain out of proportion to exam.\n2. Atrial fibrillation.\n3. Lactic acidosis.\n\nD",
     None, "D"),
    ("Therefore the correct choice is:\n\nC) Lumbar puncture", None, "C"),
    ("Acute angle-closure glaucoma requires emergent IOP reduction.\n\nOption C: Timolol eye drops", None, "C"),
    ("So the answer is:\n(A)", None, "A"),
    ("The answer is c) since the others do not explain the anemia.", None, "C"),
    (
        "Question restated: which drug?\nA. Aspirin\nB. Heparin\nC. Warfarin\nD. Clopidogrel\n\n"
        "Warfarin is contraindicated, heparin is preferred in pregnancy.\nAnswer: B",
        None, "B",
    ),
    ("The answer is B.\n\nQuestion 2: A 30-year-old man presents with", None, "B"),
    # ---------- 选项文本（无字母）+ options ----------
    ("The answer is Metformin.", _DM, "A"),
    ("Given the low eGFR, the best choice is sitagliptin.\n\n**Answer:** Sitagliptin", _DM, "D"),
    ("The final answer is: $\\boxed{\\text{Glipizide}}$", _DM, "C"),
    ("Non-caseating granulomas and bilateral hilar adenopathy. The answer is sarcoidosis.", _LUNG, "A"),
    ("Answer: hypersensitivity  pneumonitis", _LUNG, "C"),
    ("The most likely diagnosis is tuberculosis, given the cavitary lesion and night sweats.", _LUNG, "B"),
    ("Anti-HBs negative, HBsAg positive, IgM anti-HBc positive. The answer is hepatitis B.", _HEP, "B"),
    (
        "Episodic palpitations, headaches and sweating with paroxysmal hypertension.\n\n"
        "The most likely diagnosis is Pheochromocytoma",
        _PHEO, "B",
    ),
    ("Sudden worst headache of life with a normal exam.\n\n**CT scan of the head without contrast**", _STEP, "B"),
    ("The most appropriate next step is to perform a lumbar puncture.", _STEP, None),
    ("The answer is insulin.", _AMBIG, "A"),
    ("The answer is Insulin plus metformin, given the HbA1c of 11%.", _AMBIG, "B"),
    ("The answer is lifestyle modification.", _AMBIG, None),
    ("The answer is Metformin.", None, None),
    ("The answer is dapagliflozin.", _DM, None),
    ("The answer is B) Insulin glargine", _DM, "B"),
    # ---------- 应返回 None：回显的题目 / 选项 ----------
    ("A. Aspirin\nB. Heparin\nC. Warfarin\nD. Clopidogrel", None, None),
    (
        "A 62-year-old man comes to the emergency department because of chest pain. Which of the "
        "following is the most appropriate next step in management?\n\nA) Aspirin\nB) Heparin\n"
        "C) Alteplase\nD) Coronary angiography",
        None, None,
    ),
    ("Answer choices:\n(A) Metformin\n(B) Insulin glargine\n(C) Glipizide\n(D) Sitagliptin", _DM, None),
    ("Options:\nA: Sarcoidosis\nB: Tuberculosis\nC: Hypersensitivity pneumonitis\nD: Lymphoma\n", _LUNG, None),
    ("Answer:\nA. Aspirin\nB. Heparin\nC. Warfarin\nD. Clopidogrel", None, None),
    ("- A. Aspirin\n- B. Heparin\n- C. Warfarin\n- D. Clopidogrel\n<|eot_id|>", None, None),
    # ---------- 应返回 None：拒答 ----------
    ("I cannot provide medical advice. Please consult a licensed healthcare professional.", None, None),
    (
        "I'm not able to answer this question because it requires a clinical judgment that should be "
        "made by a qualified physician.",
        None, None,
    ),
    ("I can't help with that.<|eot_id|>", None, None),
    # ---------- 应返回 None：截断 ----------
    (
        "## Step 1: Identify the findings\nThe patient has a widened mediastinum and unequal blood "
        "pressures in both arms.\n\n## Step 2: Determine the diagnosis\nThis suggests aortic dissection, "
        "so the most likely answer is",
        None, None,
    ),
    ("The answer is B.\n\nWait, the troponin is normal. So the correct answer is", None, None),
    ("Given these findings, the final answer is: $\\boxed{", None, None),
    ("The most likely diagnosis is", None, None),
    ("Let's analyze each option:\nA. Aspirin: reduces mortality\nB. Heparin: prevents clot extension\nC. Alteplase: is",
     None, None),
    ("...and since the creatinine is rising, the best next step would be a", None, None),
    # ---------- 应返回 None：对冲 ----------
    ("The answer is either B or C.", None, None),
    ("It could be A or B.", None, None),
    ("The answer is B or C, depending on the renal function.", None, None),
    ("I think the answer is A/B.", None, None),
    ("Both A and C are plausible, so I cannot decide.", None, None),
    # ---------- 应返回 None：模板 ----------
    ("Answer: A, B, C, or D", None, None),
    ("The answer is [letter]", None, None),
    ("Please respond with the correct letter (A/B/C/D).", None, None),
    ("The answer is (A/B/C/D)", None, None),
    ("Finish with: The answer is X.", None, None),
    ("Answer: <letter>", None, None),
    # ---------- 应返回 None：只有医学伪字母 ----------
    ("The patient should receive vitamin A supplementation.", None, None),
    ("Serology confirms hepatitis B.", None, None),
    ("This is consistent with type A aortic dissection.", None, None),
    ("The newborn is at risk of group B strep sepsis.", None, None),
    ("The best drug here is a Class I antiarrhythmic.", None, None),
    ("This is stage C heart failure.", None, None),
    ("The patient is in phase 2 of the trial.", None, None),
    ("The answer is B cells.", None, None),
    ("The most likely diagnosis is C. difficile colitis.", None, None),
    ("The most useful test is the A-a gradient.", None, None),
    ("Low C-peptide.", None, None),
    ("The most appropriate next step is HbA1c measurement.", None, None),
    # ---------- 更多显式形式与排版 ----------
    ("The correct answer is: \n\n**B**\n\nExplanation: the others are wrong.", None, "B"),
    ("Correct Answer: (C)\n\nReferences: Harrison's, chapter 12.", None, "C"),
    ("The answer is **(C) Sarcoidosis**.", None, "C"),
    ("Therefore, the answer is \\( \\boxed{B} \\)", None, "B"),
    ("The answer is: $\\boxed{\\text{C}}$", None, "C"),
    ("Final Answer: The final answer is $\\boxed{B}$. I hope it is correct.", None, "B"),
    ("The final answer is C. I hope it is correct.", None, "C"),
    ("i would choose b.", None, "B"),
    ("ANSWER: B. TUBERCULOSIS", None, "B"),
    ("Answer: Option C", None, "C"),
    ("Answer: c.", None, "C"),
    ("answer is d", None, "D"),
    ("The answer is A", None, "A"),
    ("the best answer is option d) sitagliptin", None, "D"),
    ("Answer: [C]", None, "C"),
    ("The correct response is A.", None, "A"),
    ("The answer to this question is C.", None, "C"),
    ("The most appropriate pharmacotherapy is (D).", None, "D"),
    ("The answer is B (Tuberculosis).", None, "B"),
    ("So the answer is (B), which is hypertension.", None, "B"),
    ("Thus, answer B.", None, "B"),
    ("Hence the answer is D", None, "D"),
    ("In conclusion, B.", None, "B"),
    ("A is incorrect. B is incorrect. C is correct. D is incorrect.", None, "C"),
    ("Option B is correct because it treats the cause.", None, "B"),
    ("The most likely cause is vitamin B12 deficiency (B).", None, "B"),
    ("The most likely diagnosis is Sarcoidosis (A). However, tuberculosis must be excluded.", None, "A"),
    ("**Answer**\n\nB", None, "B"),
    ("Answer\n(C) Sarcoidosis", None, "C"),
    ("Choice B", None, "B"),
    ("C - Glipizide", None, "C"),
    ("The patient likely has type B aortic dissection.\nB", None, "B"),
    ("<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is B.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nThe answer is C", None, "B"),
    # ---------- 先答后释 / 答案之后出现列表 ----------
    ("The answer is B.\n\nNote: Answer choices A, C, and D are incorrect.", None, "B"),
    ("The answer is B, C is wrong because it causes hyperkalemia.", None, "B"),
    ("Correct answer: B\nIncorrect answer: A", None, "B"),
    ("Final answer: D\n\n### Explanation\n1. A is wrong.\n2. B is wrong.\n3. C is wrong.", None, "D"),
    ("The answer is D.\n\nA. Aspirin\nB. Heparin\nC. Warfarin\nD. Clopidogrel", None, "D"),
    ("The correct answer is B) Hypertension\n\nThe other options:\nA) Wrong\nC) Wrong\nD) Wrong", None, "B"),
    # ---------- 复读到 token 上限：之前的结论一致 ----------
    ("The answer is B. The answer is B. The answer is B. The answer is", None, "B"),
    ("Answer: B\nAnswer: B\nAnswer:", None, "B"),
    # ---------- 选项文本里含伪字母 ----------
    ("The answer is vitamin B12 deficiency.", _VIT, "B"),
    ("Macrocytic anemia with neurological signs.\n\n**Vitamin B12 deficiency**", _VIT, "B"),
    ("The answer is vitamin B12 deficiency.", None, None),
    # ---------- 更多 None ----------
    ("None of the options is correct.", None, None),
    ("The answer is none of the above.", None, None),
    ("Answer: E. None of the above", None, None),
    ("The answer is: A patient with Horner syndrome needs imaging.", None, None),
    ("The most likely diagnosis is B-cell lymphoma.", None, None),
    ("The answer: B and D", None, None),
    ("The answer is not A.", None, None),
    ("I cannot choose between A and B without more information.", None, None),
    ("I would not choose A.", None, None),
    ("The answer is A. fumigatus infection.", None, None),
    ("Answer: B12 deficiency", None, None),
    ("The answer is (A) or (B).", None, None),
    ("A. Aspirin - incorrect\nB. Heparin - correct\nC. Warfarin - incorrect\nD. Clopidogrel - incorrect", None, None),
    ("The answer is a", None, None),
    ("Answer: E", None, None),
    ("Tuberculosis is less likely than sarcoidosis (A).", None, None),
    ("Answer: I don't know.", None, None),
    ("The answer is unclear without more information.", None, None),
    ("Answer: N/A", None, None),
    ("Answer: Not enough information.", None, None),
    ("Q: What is the diagnosis?\nA: The patient most likely has sarcoidosis.", None, None),
    (
        "A 45-year-old man presents with fever. Which of the following is the most likely diagnosis?\n"
        "A. Sarcoidosis\nB. Tuberculosis\nC. Lymphoma\nD. Histoplasmosis\nAnswer:",
        None, None,
    ),
    # ---------- 排版变体与内联回显 ----------
    ("Therefore, option B is the most likely diagnosis.", None, "B"),
    ("Based on the information provided, the most likely diagnosis is **Tuberculosis (B)**.", None, "B"),
    ("The answer is B.Tuberculosis", None, "B"),
    ("The answer is (B)Tuberculosis", None, "B"),
    ("The answer is B (or possibly C).", None, "B"),
    ("The most likely diagnosis is A, given the history.", None, "A"),
    ("Answer: B?", None, "B"),
    ("A. Aspirin\nB. Heparin\nC. Warfarin\nD. Clopidogrel\n\nC", None, "C"),
    ("Hepatitis B is the most likely diagnosis.", None, None),
    ("The answer is 2.", None, None),
    ("The answer is C, D.", None, None),
    ("A. Aspirin\nB. Heparin\nC. Warfarin\nD. Clopidogrel\nE. Enoxaparin", None, None),
    ("I'm sorry, but I can't choose an option for this medical question.", None, None),
    ("Answer: A) Aspirin B) Heparin C) Warfarin D) Clopidogrel", None, None),
    ("Options: A) Aspirin B) Heparin C) Warfarin D) Clopidogrel", None, None),
    # ---------- 答案之后解释其它选项：条件句、转折句里的字母不是结论 ----------
    ("The correct answer is B.\n\nOption A is the most likely cause of hyperthyroidism, not hypothyroidism.", None, "B"),
    ("The answer is B.\n\nIf she had exophthalmos, the most likely diagnosis would be (A) Graves disease.", None, "B"),
    ("The answer is B.\n\nThe most likely diagnosis would be (A) if the patient had exophthalmos.", None, "B"),
    ("B is the correct answer, not A.", None, "B"),
    ("Option C is the most likely diagnosis.", None, "C"),
    ("The most likely diagnosis is (C) Sarcoidosis, not tuberculosis.", None, "C"),
    (
        "To answer this question, we consider the TSH.\n\nTherefore, the correct answer is:\n\n"
        "B. Hashimoto thyroiditis",
        None, "B",
    ),
    (
        "Final Answer: B. Hashimoto thyroiditis\n\nI hope this helps! Let me know if you have any other "
        "questions.",
        None, "B",
    ),
    (
        "The correct answer is B) Hashimoto thyroiditis.\n\nHere's why the other options are incorrect:\n\n"
        "A) Graves disease - causes hyperthyroidism.\nC) Subacute thyroiditis - painful.\n"
        "D) Pituitary adenoma - would cause low TSH.",
        None, "B",
    ),
    ("B is the correct answer if the patient is stable.", None, None),
    ("Answer: B is incorrect because it causes hypokalemia.", None, None),
    ("The correct answer is not listed, but the closest is C.", None, None),
    # ---------- 条件句 ----------
    ("If I had to choose, I would choose B.", None, "B"),
    ("If I were to pick one, the answer would be C.", None, "C"),
    ("If the patient were pregnant, the answer would be A. Here the answer is D.", None, "D"),
    ("The answer is B because if untreated, the infection spreads.", None, "B"),
    ("If the patient were pregnant, the answer would be A.", None, None),
]

CASES: list[Case] = [(text, None, expected) for text, expected in _LEGACY] + _NEW
